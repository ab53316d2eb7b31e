"""The relevance pass as the LRP rules read: slow, obviously correct, for the tests.

Each consumer of a layer's output sends its relevance back through its own transposed
convolution, with its BatchNorm folded into the producer's weights and the pre-activations
recomputed by a forward convolution, exactly as the equations are written. The fused pass
(``isnet_fast.engine.densenet.relevance``) must agree with it at any input size and channel count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .forward import Activations
from ..rules import ZB_HIGH, ZB_LOW, batchnorm_fold
from ..torch_ops import stabilize
from .plan import DenseNetPlan


def _transposed(s, weight, stride, padding, input_hw):
    """conv_transpose2d of s (B x C x out x h x w), sized back to input_hw."""
    batch, classes = s.shape[:2]
    k = weight.shape[-2:]
    output_padding = tuple(input_hw[d] - ((s.shape[3 + d] - 1) * stride - 2 * padding + k[d]) for d in range(2))
    c = F.conv_transpose2d(s.flatten(0, 1), weight, stride=stride, padding=padding, output_padding=output_padding)
    return c.view(batch, classes, *c.shape[1:])


def _epsilon_step(consumers, a_in, weight, stride, padding, e):
    """Relevance at a linear map's input from its consumers' relevances.

    consumers: (relevance at the consumer's ReLU, BatchNorm scale, shift) per consumer, each
    over this map's output channels. One transposed convolution per consumer.
    """
    total = 0
    for relevance, scale, shift in consumers:
        fused = weight * scale.view(-1, 1, 1, 1)
        z = F.conv2d(a_in, fused, shift, stride=stride, padding=padding)
        s = relevance / stabilize(z, e).unsqueeze(1)
        total = total + _transposed(s, fused, stride, padding, a_in.shape[-2:])
    return a_in.unsqueeze(1) * total


def _identity_weight(channels, kernel, like):
    return torch.eye(channels, dtype=like.dtype, device=like.device).view(channels, channels, 1, 1) \
        .repeat(1, 1, kernel, kernel) / (kernel * kernel)


def reference_relevance(plan: DenseNetPlan, acts: Activations, e: float, zb: bool, *,
                        overwrite_unpool: bool = True) -> torch.Tensor:
    """Heatmaps B x C x 3 x H x W, one per class. ``overwrite_unpool``: the original's un-pooling
    (CPU ``max_unpool2d``: where several pooled positions chose a pixel, the last one written
    wins); False adds every pooled position's relevance into the pixel it chose."""
    f = plan.features
    y, a = acts.y, acts.classifier_input
    linear = plan.classifier
    bias = None if linear.bias is None else linear.bias.detach()
    z = F.linear(a, linear.weight, bias)
    s = torch.diag_embed(y) / stabilize(z, e).unsqueeze(1)  # relevance diag(y) over z
    relevance = a.unsqueeze(1) * (s @ linear.weight)  # B x C x F
    last = acts.blocks[-1].post_relu_out
    s = relevance / stabilize(acts.pooled.flatten(1), e).unsqueeze(1)
    post = last.unsqueeze(1) * (s[..., None, None] / (last.shape[-2] * last.shape[-1]))

    block_input_relevance = None
    for index in reversed(range(len(plan.blocks))):
        block, block_acts = plan.blocks[index], acts.blocks[index]
        features = block_acts.output
        if block.transition is not None:
            conv = block.transition.conv
            nxt = plan.blocks[index + 1]
            pooled = acts.blocks[index + 1].output[:, :nxt.in_channels]
            avg = _identity_weight(nxt.in_channels, 2, pooled)
            consumers = [(r[:, :, :nxt.in_channels], *batchnorm_fold(bn, acts.blocks[index + 1].output[:, :bn.num_features]))
                         for r, bn in block_input_relevance]
            consumers = [(r, sc[:nxt.in_channels], sh[:nxt.in_channels]) for r, sc, sh in consumers]
            at_relu2 = _epsilon_step(consumers, block_acts.transition_relu2_out, avg, 2, 0, e)
            s = at_relu2 / stabilize(block_acts.transition_conv_out, e).unsqueeze(1)
            post = block_acts.post_relu_out.unsqueeze(1) * _transposed(s, conv.weight, 1, 0, features.shape[-2:])
        at_layer = {}
        for layer_plan, layer_acts in zip(reversed(block.layers), reversed(block_acts.layers)):
            layer = layer_plan.module
            m = int(layer_plan.name[len("denselayer"):])
            sl = slice(layer_plan.out_start, layer_plan.out_stop)
            pairs = [(post, block.post_norm)] + [(at_layer[src], bn) for src, items in block.consumers.items()
                                                for producer, bn in items if producer == m]
            consumers = []
            for r, bn in pairs:
                scale, shift = batchnorm_fold(bn, features[:, :bn.num_features])
                consumers.append((r[:, :, sl], scale[sl], shift[sl]))
            at_relu2 = _epsilon_step(consumers, layer_acts.relu2_out, layer.conv2.weight, 1, 1, e)
            scale, shift = batchnorm_fold(layer.norm2, layer_acts.conv1_out)
            at_layer[m] = _epsilon_step([(at_relu2, scale, shift)], layer_acts.relu1_out, layer.conv1.weight, 1, 0, e)
        block_input_relevance = [(post, block.post_norm)] + [(at_layer[m], block.layers[m - 1].module.norm1)
                                                           for m in sorted(at_layer, reverse=True)]

    first = plan.blocks[0]
    pooled = acts.blocks[0].output[:, :first.in_channels]
    channels = first.in_channels
    identity = _identity_weight(channels, 1, pooled)
    total = 0
    for r, bn in block_input_relevance:
        scale, shift = batchnorm_fold(bn, acts.blocks[0].output[:, :bn.num_features])
        fused = identity * scale[:channels].view(-1, 1, 1, 1)
        z = F.conv2d(pooled, fused, shift[:channels])
        s = r[:, :, :channels] / stabilize(z, e).unsqueeze(1)
        total = total + _transposed(s, fused, 1, 0, pooled.shape[-2:])
    batch, classes = total.shape[:2]
    pool = f.pool0
    indices = acts.pool0_indices.repeat_interleave(classes, dim=0)
    input_hw = acts.relu0_out.shape[-2:]
    if overwrite_unpool:
        unpooled = F.max_unpool2d(total.flatten(0, 1), indices, pool.kernel_size, pool.stride, pool.padding,
                                  output_size=input_hw)
    else:
        flat = total.flatten(0, 1).flatten(2)  # (B C) x ch x (h w)
        unpooled = flat.new_zeros(*flat.shape[:2], input_hw[0] * input_hw[1]).scatter_add(2, indices.flatten(2), flat)
    unpooled = unpooled.view(batch, classes, channels, *input_hw)
    at_relu0 = acts.relu0_out.unsqueeze(1) * unpooled

    conv0, x = f.conv0, acts.x
    scale, shift = batchnorm_fold(f.norm0, acts.conv0_out)
    fused = conv0.weight * scale.view(-1, 1, 1, 1)
    stride, padding = conv0.stride[0], conv0.padding[0]
    if not zb:
        return _epsilon_step([(at_relu0, scale, shift)], x, conv0.weight, stride, padding, e)
    positive, negative = fused.clamp(min=0), fused.clamp(max=0)
    ones = torch.ones_like(x)
    z = (F.conv2d(x, fused, shift, stride=stride, padding=padding)
         - F.conv2d(ones * ZB_LOW, positive, shift.clamp(min=0) * ZB_LOW, stride=stride, padding=padding)
         - F.conv2d(ones * ZB_HIGH, negative, shift.clamp(max=0) * ZB_HIGH, stride=stride, padding=padding))
    s = at_relu0 / stabilize(z, e).unsqueeze(1)
    hw = x.shape[-2:]
    return (x.unsqueeze(1) * _transposed(s, fused, stride, padding, hw)
            - ZB_LOW * _transposed(s, positive, stride, padding, hw)
            - ZB_HIGH * _transposed(s, negative, stride, padding, hw))
