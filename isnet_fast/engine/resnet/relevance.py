"""The ResNet's forward pass keeping activations, and its fused relevance pass.

The forward calls the model's own modules in the order of torchvision's layout, so BatchNorm
running statistics (and dropout draws) move exactly as in ``model(x)``; no hooks.

The relevance pass walks the plan backwards with the DenseNet pass's conventions
(``isnet_fast.engine.densenet.relevance``): relevance travels as a factor ``c`` with ``R = activation * c``, in
tensors ``B x M x ch x H x W`` (M maps per image), and each convolution's relevance goes back
through one transposed convolution of its quotient (the factor times a class-independent gate,
the BatchNorm after the conv folded in). The rules (the authors' ``LRPResNet``):

* every conv + BatchNorm folded (``relevance.batchnorm_fold``), the epsilon rule;
* the residual sum ``s = a + b`` (shortcut ``a``, branch ``b``): the shortcut gets
  ``R * a / stab(s)``, the branch ``R * b / stab(s)``; the post-sum ReLU passes relevance as it is.
  Each share is fused into the step that consumes it (``ops.residual_split_gated``: the share
  times the gate of the conv that made ``b`` or ``a``; ``ops.residual_shortcut_add`` for an
  identity shortcut);
* the max pool: ``R_in = act * unpool(R_out / stab(pooled))``, un-pooled by the original's
  overwrite rule (or summing, ``overwrite_unpool=False``);
* conv1 + bn1 by z^B (bounds 0 and 1) or the epsilon rule (``engine.stem.pooled_stem_relevance``).

A step the ops module lacks runs the torch ops' version (``_op``); ``triton_ops`` has them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F

from .. import torch_ops
from ..rules import batchnorm_fold, check_finite_images, check_image_batch, conv_transpose, is_forward_fold, relu_of_fresh
from ..stem import pooled_stem_relevance
from ..torch_ops import merge_batch_and_classes, split_batch_and_classes, stabilize
from .plan import ResidualBlockPlan, ResNetPlan


@dataclass
class ResidualBlockActivations:
    conv_inputs: List[torch.Tensor]  # each branch conv's input: the block input, then the ReLU outputs
    conv_outputs: List[torch.Tensor]  # each branch conv's output (its BatchNorm's input)
    branch: torch.Tensor  # b, the last BatchNorm's output
    shortcut: torch.Tensor  # a, the block input or the downsample BatchNorm's output
    downsample_conv_out: Optional[torch.Tensor]
    total: torch.Tensor  # s = a + b
    output: torch.Tensor  # relu(s)

    @property
    def block_input(self) -> torch.Tensor:
        return self.conv_inputs[0]


@dataclass
class ResNetActivations:
    x: torch.Tensor
    stem_conv_out: torch.Tensor
    stem_relu_out: torch.Tensor
    pool_indices: torch.Tensor
    pool_out: torch.Tensor  # layer1's input
    blocks: List[ResidualBlockActivations] = field(default_factory=list)
    pooled: Optional[torch.Tensor] = None  # avgpool's output, B x F x 1 x 1
    classifier_input: Optional[torch.Tensor] = None  # after the classifier's dropout
    y: Optional[torch.Tensor] = None


def check_resnet_input(x: torch.Tensor, plan: ResNetPlan, check_finite: bool = True) -> None:
    """Raises a ValueError or TypeError that says what is wrong with the input and how to fix it
    (as ``forward.check_input`` does for the DenseNet)."""
    check_image_batch(x, plan.stem.conv)
    if check_finite:
        check_finite_images(x, "IsResNetFast")


def run_resnet_forward(plan: ResNetPlan, x: torch.Tensor) -> ResNetActivations:
    stem = plan.stem
    stem_conv_out = stem.conv(x)
    stem_relu_out = relu_of_fresh(plan.stem_relu, stem.bn(stem_conv_out))
    pool = plan.maxpool
    features, indices = F.max_pool2d(stem_relu_out, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                     ceil_mode=pool.ceil_mode, return_indices=True)
    acts = ResNetActivations(x, stem_conv_out, stem_relu_out, indices, features)
    for block in plan.blocks:
        conv_inputs, conv_outputs = [], []
        hidden = features
        for position, unit in enumerate(block.convs):
            conv_inputs.append(hidden)
            conv_outputs.append(unit.conv(hidden))
            normalised = unit.bn(conv_outputs[-1])
            if position < len(block.convs) - 1:
                hidden = relu_of_fresh(block.relus[position], normalised)
        downsample_conv_out = None
        shortcut = features
        if block.downsample is not None:
            downsample_conv_out = block.downsample.conv(features)
            shortcut = block.downsample.bn(downsample_conv_out)
        total = normalised + shortcut
        features = block.relus[-1](total)
        acts.blocks.append(ResidualBlockActivations(conv_inputs, conv_outputs, normalised, shortcut,
                                                    downsample_conv_out, total, features))
    acts.pooled = plan.avgpool(features)
    classifier_input = torch.flatten(acts.pooled, 1)
    if plan.classifier_pre is not None:
        classifier_input = plan.classifier_pre(classifier_input)
    acts.classifier_input = classifier_input
    acts.y = plan.classifier(classifier_input)
    return acts


def _op(ops, name: str):
    """``ops.name``, or the torch version where the backend has none yet (the ResNet-only steps)."""
    return getattr(ops, name, None) or getattr(torch_ops, name)


def global_pool_relevance(at_classifier_input: torch.Tensor, acts: ResNetActivations, e: float) -> torch.Tensor:
    """From the relevance at the classifier's input (``B x M x F``) through the global average
    pool: the factor at the last block's output, ``B x M x F x H x W`` (expanded, not copied)."""
    last = acts.blocks[-1].output
    height, width = last.shape[-2:]
    factor = at_classifier_input / stabilize(acts.pooled.flatten(1), e).unsqueeze(1) / (height * width)
    return factor[..., None, None].expand(-1, -1, -1, height, width)


def residual_block_relevance(block: ResidualBlockPlan, acts: ResidualBlockActivations, factor: torch.Tensor,
                             e: float, ops) -> torch.Tensor:
    """The factor at the block's input from the factor at its output (after the post-sum ReLU)."""
    batch = factor.shape[0]
    split = _op(ops, "residual_split_gated")
    last = block.convs[-1]
    scale, shift = batchnorm_fold(last.bn, acts.conv_outputs[-1])
    # acts.output is relu(acts.total): the hints' shortcuts, which the ops take only without autograd
    quotient = split(factor, acts.output, acts.total, acts.branch, acts.conv_outputs[-1], scale, shift, e,
                     out_is_relu=True, part_is_fold=is_forward_fold(last.bn))
    back = conv_transpose(last.conv, merge_batch_and_classes(quotient), acts.conv_inputs[-1].shape[-2:])
    for position in reversed(range(len(block.convs) - 1)):
        unit = block.convs[position]
        scale, shift = batchnorm_fold(unit.bn, acts.conv_outputs[position])
        quotient = ops.gated_product(split_batch_and_classes(back, batch), acts.conv_inputs[position + 1],
                                     acts.conv_outputs[position], scale, shift, e,
                                     act_is_relu=is_forward_fold(unit.bn))
        back = conv_transpose(unit.conv, merge_batch_and_classes(quotient), acts.conv_inputs[position].shape[-2:])
    branch = split_batch_and_classes(back, batch)
    if block.downsample is None:
        return _op(ops, "residual_shortcut_add")(branch, factor, acts.output, acts.total, e, out_is_relu=True)
    downsample = block.downsample
    scale, shift = batchnorm_fold(downsample.bn, acts.downsample_conv_out)
    quotient = split(factor, acts.output, acts.total, acts.shortcut, acts.downsample_conv_out, scale, shift, e,
                     out_is_relu=True, part_is_fold=is_forward_fold(downsample.bn))
    back = conv_transpose(downsample.conv, merge_batch_and_classes(quotient), acts.block_input.shape[-2:])
    return branch + split_batch_and_classes(back, batch)


def stem_relevance(plan: ResNetPlan, acts: ResNetActivations, factor: torch.Tensor, e: float, zb: bool, ops,
                   overwrite_unpool: bool = True) -> torch.Tensor:
    """From the factor at the max pool's output to the input heatmaps: the pool's epsilon step
    (its output over its stabiliser; the pooled values are >= 0, the ReLU of themselves), the
    un-pooling, and conv1/bn1 by the z^B rule or the epsilon rule."""
    pooled = acts.pool_out
    quotient = ops.gated_product(factor, pooled, pooled, None, None, e, act_is_relu=True)
    return pooled_stem_relevance(plan.stem.conv, plan.stem.bn, plan.maxpool, acts.x, acts.stem_conv_out,
                                 acts.stem_relu_out, acts.pool_indices, quotient, e, zb, ops, overwrite_unpool)


def resnet_relevance(plan: ResNetPlan, acts: ResNetActivations, e: float, zb: bool, at_classifier_input: torch.Tensor,
                     ops=torch_ops, overwrite_unpool: bool = True) -> torch.Tensor:
    """Heatmaps ``B x M x 3 x H x W`` from the forward pass's activations and the relevance at the
    classifier's input, ``B x M x F`` (what the maps explain, ``isnet_fast.engine.output``)."""
    factor = global_pool_relevance(at_classifier_input, acts, e)
    for block, block_acts in zip(reversed(plan.blocks), reversed(acts.blocks)):
        factor = residual_block_relevance(block, block_acts, factor, e, ops)
    return stem_relevance(plan, acts, factor, e, zb, ops, overwrite_unpool)
