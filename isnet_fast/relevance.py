"""The fused relevance pass in plain torch ops.

Every convolution's relevance goes back through one transposed convolution, however many
layers consume its output: each consumer's epsilon-rule quotient (its BatchNorm folded into
the producer, with the stabiliser) is summed channel-wise first. Everything that does not
depend on the class (activations, folds, stabilised denominators) is computed once per image
as a "gate" and broadcast over the classes; relevance tensors are ``B x C x ch x H x W``.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .forward import Activations
from .functions import max_unpool_overwrite, overwrite_winners
from .structure import DenseBlockPlan, DenseNetPlan

ZB_LOW, ZB_HIGH = 0.0, 1.0  # the z^B rule's pixel bounds, as in the original


def stabilize(z: torch.Tensor, e: float) -> torch.Tensor:
    """z + e * sign(z), with sign(0) = +1."""
    # The sign term is a constant for autograd: adding it keeps the backward a pass-through.
    sign = (z.detach() >= 0).to(z.dtype) * (2 * e) - e
    return z + sign


def batchnorm_fold(bn: nn.BatchNorm2d, batch_input: torch.Tensor = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of a BatchNorm folded into the linear map before it.

    Statistics are detached, as is beta; gamma is not. In training the statistics are the batch
    mean and the *unbiased* batch variance of ``batch_input`` (the BatchNorm's input), as the
    original computes them.
    """
    if bn.training:
        data = batch_input.detach()
        mean = data.mean(dim=(0, 2, 3))
        var = data.var(dim=(0, 2, 3))
    else:
        mean, var = bn.running_mean.detach(), bn.running_var.detach()
    std = torch.sqrt(var + bn.eps)
    scale = bn.weight / std
    shift = bn.weight * (-mean / std) + bn.bias.detach()
    return scale, shift


def _channels(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def conv_transpose(conv: nn.Conv2d, relevance: torch.Tensor, input_hw, weight: torch.Tensor = None) -> torch.Tensor:
    """Transposed ``conv`` of ``relevance`` (N x out x h x w), sized back to its input ``input_hw``.

    The output padding restores sizes that strided convolutions round down, so any input size
    the DenseNet accepts works (the original's fixed padding needs multiples of 32).
    """
    weight = conv.weight if weight is None else weight
    output_padding = []
    for dim in range(2):
        k, s, p, d = conv.kernel_size[dim], conv.stride[dim], conv.padding[dim], conv.dilation[dim]
        natural = (relevance.shape[2 + dim] - 1) * s - 2 * p + d * (k - 1) + 1
        output_padding.append(input_hw[dim] - natural)
    return F.conv_transpose2d(relevance, weight, stride=conv.stride, padding=conv.padding,
                              output_padding=tuple(output_padding), dilation=conv.dilation, groups=conv.groups)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """B x C x ch x H x W -> (B*C) x ch x H x W, the layout convolutions take."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _unflat(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.view(batch, t.shape[0] // batch, *t.shape[1:])


def consumer_folds(block: DenseBlockPlan, block_input: torch.Tensor) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """For each layer m, the fold (scale, shift) over the channels its relevance reaches.

    ``block_input`` is the block's concatenated features (the BatchNorms' input in training).
    Channel ranges whose producer does not take layer m's relevance (see
    ``structure.consumer_pairs``) get scale 0 and shift 1: they contribute exactly nothing.
    """
    bn_folds = {}
    folds = {}
    for m, pairs in block.consumers.items():
        paired = dict(pairs)
        scales, shifts = [], []
        for producer in range(m):
            sl = block.producer_slice(producer)
            bn = paired.get(producer)
            if bn is None:
                width = sl.stop - sl.start
                scales.append(block_input.new_zeros(width))
                shifts.append(block_input.new_ones(width))
                continue
            if id(bn) not in bn_folds:
                bn_folds[id(bn)] = batchnorm_fold(bn, block_input[:, :bn.num_features])
            scales.append(bn_folds[id(bn)][0][sl])
            shifts.append(bn_folds[id(bn)][1][sl])
        if len({id(bn) for _, bn in pairs}) == 1 and len(pairs) == m:
            bn = pairs[0][1]  # one BatchNorm over all channels: use its fold as it is
            folds[m] = bn_folds[id(bn)]
        else:
            folds[m] = (torch.cat(scales), torch.cat(shifts))
    return folds


def _gate(activation: torch.Tensor, z: torch.Tensor, e: float, scale: torch.Tensor = None) -> torch.Tensor:
    """activation * scale / stabilize(z): the class-independent factor of an epsilon step."""
    gate = activation / stabilize(z, e)
    return gate if scale is None else gate * _channels(scale)


class _Accumulator:
    """Sums the consumers' quotients per channel range of a block's concatenation.

    Without autograd it adds in place into one block-wide tensor, so each consumer's quotient
    is freed at once. With autograd it splits each quotient into its producers' ranges once
    (one cheap backward node, where per-range slicing would zero-fill a full gradient per range)
    and sums a producer's pieces when it needs them.
    """

    def __init__(self, block: DenseBlockPlan, first: torch.Tensor, in_place: bool):
        self.in_place = in_place
        self.widths = [block.in_channels] + [layer.out_stop - layer.out_start for layer in block.layers]
        if in_place:
            self.total = first
        else:
            self.pieces = [[] for _ in self.widths]
            self._split(first)

    def _split(self, quotient: torch.Tensor) -> None:
        count = width_segments(quotient.shape[2], self.widths)
        for producer, piece in enumerate(torch.split(quotient, self.widths[:count], dim=2)):
            self.pieces[producer].append(piece)

    def add(self, relevance: torch.Tensor, gate: torch.Tensor) -> None:
        if self.in_place:
            self.total[:, :, :relevance.shape[2]].addcmul_(relevance, gate.unsqueeze(1))
        else:
            self._split(relevance * gate.unsqueeze(1))

    def take(self, producer: int) -> torch.Tensor:
        if self.in_place:
            start = sum(self.widths[:producer])
            return self.total[:, :, start:start + self.widths[producer]]
        pieces = self.pieces[producer]
        self.pieces[producer] = []  # its last consumer has used it
        total = pieces[0]
        for piece in pieces[1:]:
            total = total + piece
        return total


def width_segments(width: int, widths) -> int:
    """How many producer ranges (block input first) make up the first ``width`` channels."""
    total = 0
    for count, w in enumerate(widths, start=1):
        total += w
        if total == width:
            return count
    raise AssertionError(f"{width} channels do not end on a producer boundary")


def block_relevance(block: DenseBlockPlan, acts, post_relevance: torch.Tensor, e: float,
                    in_place: bool) -> torch.Tensor:
    """Relevance through a dense block.

    ``post_relevance`` is the class-expanded factor c such that the relevance at the post-block
    ReLU (the transition's or norm5's) is ``post_relu_out * c``. Returns the summed quotient
    for the block input's channels: what the transition's (or stem's) pool spreads back.
    """
    features = acts.output
    batch = features.shape[0]
    post_scale, post_shift = batchnorm_fold(block.post_norm, features)
    post_gate = _gate(acts.post_relu_out, features * _channels(post_scale) + _channels(post_shift), e, post_scale)
    accumulator = _Accumulator(block, post_relevance * post_gate.unsqueeze(1), in_place)
    folds = consumer_folds(block, features)
    for layer_plan, layer_acts in zip(reversed(block.layers), reversed(acts.layers)):
        layer = layer_plan.module
        m = int(layer_plan.name[len("denselayer"):])
        quotient = accumulator.take(m)
        spatial = features.shape[-2:]
        back = conv_transpose(layer.conv2, _flat(quotient), spatial)
        norm2_scale, norm2_shift = batchnorm_fold(layer.norm2, layer_acts.conv1_out)
        gate2 = _gate(layer_acts.relu2_out,
                      layer_acts.conv1_out * _channels(norm2_scale) + _channels(norm2_shift), e, norm2_scale)
        back = _unflat(back, batch) * gate2.unsqueeze(1)
        back = conv_transpose(layer.conv1, _flat(back), spatial)
        scale, shift = folds[m]
        inputs = features[:, :layer_plan.in_channels]
        gate1 = _gate(layer_acts.relu1_out, inputs * _channels(scale) + _channels(shift), e, scale)
        accumulator.add(_unflat(back, batch), gate1)
    return accumulator.take(0)


def _spread_average_pool(quotient: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """2x2 average-pool relevance spreading times a per-pixel factor, without a convolution.

    quotient: B x C x ch x h x w; factor: B x ch x H x W with H >= 2h. Rows and columns the
    pool dropped (odd sizes) get none.
    """
    batch, classes, channels, h, w = quotient.shape
    height, width = factor.shape[-2:]
    core = factor[:, :, :2 * h, :2 * w].reshape(batch, 1, channels, h, 2, w, 2)
    spread = (quotient[:, :, :, :, None, :, None] * core).reshape(batch, classes, channels, 2 * h, 2 * w)
    if (height, width) != (2 * h, 2 * w):
        spread = F.pad(spread, (0, width - 2 * w, 0, height - 2 * h))
    return spread


def transition_relevance(block: DenseBlockPlan, acts, next_quotient: torch.Tensor, e: float) -> torch.Tensor:
    """From the next block's input quotient back to the class-expanded factor at this block's
    post ReLU: average-pool spreading, then the transition conv's epsilon step."""
    conv = block.transition.conv
    factor = acts.transition_relu2_out / stabilize(acts.transition_conv_out, e) / 4.0
    spread = _spread_average_pool(next_quotient, factor)
    back = conv_transpose(conv, _flat(spread), acts.output.shape[-2:])
    return _unflat(back, spread.shape[0])


def classifier_relevance(plan: DenseNetPlan, acts: Activations, e: float) -> torch.Tensor:
    """Output relevance diag(y) through the classifier and the global average pool.

    Returns the class-expanded factor at the last block's post ReLU, B x C x F x 1 x 1.
    """
    linear = plan.classifier
    y = acts.y
    # The original recomputes the logits with a detached bias for the denominator.
    z = y if linear.bias is None else y + (linear.bias.detach() - linear.bias)
    ratio = y / stabilize(z, e)  # B x C
    features = acts.classifier_input.unsqueeze(1) * linear.weight.unsqueeze(0) * ratio.unsqueeze(-1)  # B x C x F
    pooled = acts.pooled.flatten(1)
    hw = acts.blocks[-1].post_relu_out.shape[-2] * acts.blocks[-1].post_relu_out.shape[-1]
    factor = features / stabilize(pooled, e).unsqueeze(1) / hw
    return factor[..., None, None]


def stem_relevance(plan: DenseNetPlan, acts: Activations, quotient: torch.Tensor, e: float, zb: bool) -> torch.Tensor:
    """From the first block's input quotient to the input heatmaps: max-pool un-pooling (with the
    original's overwrite rule) and conv0/norm0 by the z^B rule or the epsilon rule."""
    f = plan.features
    x, conv0 = acts.x, f.conv0
    input_hw = acts.relu0_out.shape[-2:]
    winners = overwrite_winners(acts.pool0_indices, tuple(input_hw))
    unpooled = max_unpool_overwrite(quotient, acts.pool0_indices, winners, input_hw)
    scale, shift = batchnorm_fold(f.norm0, acts.conv0_out)
    z = acts.conv0_out * _channels(scale) + _channels(shift)
    weight = conv0.weight * scale.view(-1, 1, 1, 1)
    batch = x.shape[0]
    if not zb:
        back = conv_transpose(conv0, _flat(unpooled * _gate(acts.relu0_out, z, e).unsqueeze(1)), x.shape[-2:], weight)
        return _unflat(back, batch) * x.unsqueeze(1)
    # z^B: subtract what the bounds l (low) and h (high) would give, from positive and negative weights
    ones = x.new_ones(1, *x.shape[1:])
    weights, bounds = [weight], []
    for bound, clip in ((ZB_LOW, torch.clamp_min), (ZB_HIGH, torch.clamp_max)):
        if bound != 0:
            w_part, b_part = clip(weight, 0), clip(shift, 0)
            z = z - F.conv2d(ones * bound, w_part, b_part * bound, conv0.stride, conv0.padding, conv0.dilation)
            weights.append(w_part)
            bounds.append(bound)
    channels_in = x.shape[1]
    back = conv_transpose(conv0, _flat(unpooled * _gate(acts.relu0_out, z, e).unsqueeze(1)), x.shape[-2:],
                          torch.cat(weights, dim=1))
    back = _unflat(back, batch)
    heatmap = back[:, :, :channels_in] * x.unsqueeze(1)
    for i, bound in enumerate(bounds, start=1):
        heatmap = heatmap - bound * back[:, :, i * channels_in:(i + 1) * channels_in]
    return heatmap


def relevance(plan: DenseNetPlan, acts: Activations, e: float, zb: bool) -> torch.Tensor:
    """Heatmaps B x C x 3 x H x W, one per class, from the forward pass's activations."""
    in_place = not torch.is_grad_enabled()
    factor = classifier_relevance(plan, acts, e)
    quotient = None
    for index in reversed(range(len(plan.blocks))):
        block, block_acts = plan.blocks[index], acts.blocks[index]
        if block.transition is not None:
            factor = transition_relevance(block, block_acts, quotient, e)
        quotient = block_relevance(block, block_acts, factor, e, in_place)
    return stem_relevance(plan, acts, quotient, e, zb)
