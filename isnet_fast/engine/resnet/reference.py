"""The ResNet relevance pass as the LRP rules read: slow, obviously correct, for the tests.

One map at a time, one module at a time: each BatchNorm folded into its conv's weights by hand,
the pre-activations recomputed by a forward convolution, the relevance itself (not a factor)
carried from step to step, exactly as the equations are written. The fused pass
(``isnet_fast.engine.resnet.relevance``) must agree with it at any input size, width and depth.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..rules import ZB_HIGH, ZB_LOW
from .plan import ResNetPlan
from .relevance import ResNetActivations


def _stabilized(z, e):
    """z + e * sign(z), sign(0) = +1, the sign a constant."""
    return z + torch.where(z.detach() >= 0, torch.full_like(z, e), torch.full_like(z, -e))


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, conv_out: torch.Tensor):
    """The conv's weight and bias with the BatchNorm folded in: gamma with its gradient; beta and
    the statistics detached, in training the batch mean and unbiased variance of ``conv_out``."""
    if bn.training:
        mean = conv_out.detach().mean(dim=(0, 2, 3))
        var = conv_out.detach().var(dim=(0, 2, 3), unbiased=True)
    else:
        mean, var = bn.running_mean.detach(), bn.running_var.detach()
    factor = bn.weight / torch.sqrt(var + bn.eps)
    return conv.weight * factor.view(-1, 1, 1, 1), bn.bias.detach() - mean * factor


def _transposed(conv: nn.Conv2d, s, weight, input_hw):
    natural = [(s.shape[2 + d] - 1) * conv.stride[d] - 2 * conv.padding[d]
               + conv.dilation[d] * (conv.kernel_size[d] - 1) + 1 for d in range(2)]
    return F.conv_transpose2d(s, weight, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                              groups=conv.groups, output_padding=tuple(input_hw[d] - natural[d] for d in range(2)))


def _epsilon_conv(conv, bn, a_in, conv_out, relevance, e):
    """Relevance at a conv's input from the relevance at its BatchNorm's output (epsilon rule)."""
    weight, bias = _folded(conv, bn, conv_out)
    z = F.conv2d(a_in, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return a_in * _transposed(conv, relevance / _stabilized(z, e), weight, a_in.shape[-2:])


def _input_layer(conv, bn, x, conv_out, relevance, e, zb):
    """Relevance at the image from the relevance at bn1's output: z^B (bounds ZB_LOW, ZB_HIGH) or epsilon."""
    if not zb:
        return _epsilon_conv(conv, bn, x, conv_out, relevance, e)
    weight, bias = _folded(conv, bn, conv_out)
    positive, negative = weight.clamp(min=0), weight.clamp(max=0)
    ones = torch.ones_like(x)
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    z = (F.conv2d(x, weight, bias, *args) - F.conv2d(ones * ZB_LOW, positive, bias.clamp(min=0) * ZB_LOW, *args)
         - F.conv2d(ones * ZB_HIGH, negative, bias.clamp(max=0) * ZB_HIGH, *args))
    s = relevance / _stabilized(z, e)
    hw = x.shape[-2:]
    return (x * _transposed(conv, s, weight, hw) - ZB_LOW * _transposed(conv, s, positive, hw)
            - ZB_HIGH * _transposed(conv, s, negative, hw))


def _unpool(s, indices, pool: nn.MaxPool2d, output_hw, overwrite: bool):
    if overwrite:  # torch's CPU max_unpool2d writes in raster order: the last pooled position wins
        return F.max_unpool2d(s, indices, pool.kernel_size, pool.stride, pool.padding, output_size=output_hw)
    batch, channels = s.shape[:2]
    flat = s.new_zeros(batch, channels, output_hw[0] * output_hw[1])
    return flat.scatter_add(2, indices.flatten(2), s.flatten(2)).view(batch, channels, *output_hw)


def reference_resnet_relevance(plan: ResNetPlan, acts: ResNetActivations, e: float, zb: bool,
                               at_classifier_input: torch.Tensor, overwrite_unpool: bool = True) -> torch.Tensor:
    """Heatmaps ``B x M x 3 x H x W`` from the relevance at the classifier's input, ``B x M x F``."""
    maps = []
    for m in range(at_classifier_input.shape[1]):
        last = acts.blocks[-1].output
        s = at_classifier_input[:, m] / _stabilized(acts.pooled.flatten(1), e)
        relevance = last * s[:, :, None, None] / (last.shape[-2] * last.shape[-1])
        for block, block_acts in zip(reversed(plan.blocks), reversed(acts.blocks)):
            # the post-sum ReLU passes relevance unchanged; the sum splits it by the shares of a and b
            at_sum = relevance
            denominator = _stabilized(block_acts.total, e)
            to_shortcut = at_sum * block_acts.shortcut / denominator
            to_branch = at_sum * block_acts.branch / denominator
            for unit, a_in, conv_out in reversed(list(zip(block.convs, block_acts.conv_inputs,
                                                          block_acts.conv_outputs))):
                to_branch = _epsilon_conv(unit.conv, unit.bn, a_in, conv_out, to_branch, e)  # ReLUs pass it on
            if block.downsample is not None:
                to_shortcut = _epsilon_conv(block.downsample.conv, block.downsample.bn, block_acts.block_input,
                                            block_acts.downsample_conv_out, to_shortcut, e)
            relevance = to_branch + to_shortcut
        s = relevance / _stabilized(acts.pool_out, e)
        at_relu = acts.stem_relu_out * _unpool(s, acts.pool_indices, plan.maxpool, acts.stem_relu_out.shape[-2:],
                                               overwrite_unpool)
        maps.append(_input_layer(plan.stem.conv, plan.stem.bn, acts.x, acts.stem_conv_out, at_relu, e, zb))
    return torch.stack(maps, dim=1)
