"""The DenseNet forward pass, keeping the activations the relevance pass reads.

It calls the model's own modules in the order of its layout, so BatchNorm running statistics
move exactly as in ``model(x)``, and it needs no forward hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..rules import check_finite_images, check_image_batch, relu_of_fresh
from .plan import DenseNetPlan


@dataclass
class DenseLayerActivations:
    relu1_out: torch.Tensor  # input of conv1
    conv1_out: torch.Tensor
    relu2_out: torch.Tensor  # input of conv2
    conv2_out: torch.Tensor
    # The concatenated input of norm1, kept only under autograd: the relevance pass's gate reads
    # it, and its gradient then splits into the producers' without the zero-filled full-size
    # gradient a slice of the block's output would make in every layer. Without autograd the
    # pass reads that slice, so these (quadratic in the block's depth) are freed at once.
    norm1_in: Optional[torch.Tensor] = None


@dataclass
class DenseBlockActivations:
    layers: List[DenseLayerActivations] = field(default_factory=list)
    output: Optional[torch.Tensor] = None  # the concatenated features
    # after the block: the transition's (or norm5's) activations
    post_relu_out: Optional[torch.Tensor] = None  # relu(norm(output)): input of transition.conv or the pool
    transition_conv_out: Optional[torch.Tensor] = None
    transition_relu2_out: Optional[torch.Tensor] = None  # input of the average pool


@dataclass
class Activations:
    x: torch.Tensor
    conv0_out: torch.Tensor
    relu0_out: torch.Tensor
    pool0_indices: torch.Tensor
    blocks: List[DenseBlockActivations]
    pooled: torch.Tensor  # AdaptPool output, B x F x 1 x 1
    classifier_input: torch.Tensor  # after the classifier's dropout
    y: torch.Tensor


def check_input(x: torch.Tensor, plan: DenseNetPlan, check_finite: bool = True) -> None:
    """Raises a ValueError or TypeError that says what is wrong with the input and how to fix it.

    With ``check_finite`` it also rejects images holding NaN or Inf (one device sync): in
    training their batch statistics would turn every image's outputs, and the BatchNorms'
    running statistics, into NaN. Inside ``torch.compile`` that check is left out: its host sync
    would split the graph.
    """
    check_image_batch(x, plan.features.conv0)
    smallest = minimum_input_size(plan)
    if x.shape[-2] < smallest or x.shape[-1] < smallest:
        raise ValueError(f"images of {x.shape[-2]}x{x.shape[-1]} are too small for this DenseNet: every side "
                         f"must be at least {smallest} pixels so that each transition has a pixel left to pool")
    if check_finite:
        check_finite_images(x, "IsDenseFast")


def minimum_input_size(plan: DenseNetPlan) -> int:
    """The smallest side that leaves at least one pixel after every pooling layer."""
    size = 1
    for _ in plan.blocks[:-1]:
        size *= 2  # each transition's 2x2 average pool
    conv0, pool0 = plan.features.conv0, plan.features.pool0
    for module in (pool0, conv0):
        k, s, p = (torch.nn.modules.utils._pair(v)[0] for v in (module.kernel_size, module.stride, module.padding))
        d = torch.nn.modules.utils._pair(getattr(module, "dilation", 1))[0]
        size = max(1, (size - 1) * s - 2 * p + d * (k - 1) + 1)
    return size


def run_forward(plan: DenseNetPlan, x: torch.Tensor) -> Activations:
    f = plan.features
    conv0_out = f.conv0(x)
    relu0_out = relu_of_fresh(f.relu0, f.norm0(conv0_out))
    pool = f.pool0
    features, pool0_indices = F.max_pool2d(relu0_out, pool.kernel_size, pool.stride, pool.padding,
                                           pool.dilation, ceil_mode=pool.ceil_mode, return_indices=True)
    blocks = []
    for block in plan.blocks:
        acts = DenseBlockActivations()
        concatenated = [features]
        for layer_plan in block.layers:
            layer = layer_plan.module
            if layer.training and getattr(layer, "drop_rate", 0) > 0:
                raise ValueError(f"{block.name}.{layer_plan.name} has drop_rate={layer.drop_rate}: the relevance pass "
                                 "(like the original's) assumes no dropout inside dense blocks; build the DenseNet "
                                 "with drop_rate=0 (dropout before the classifier is supported)")
            norm1_in = torch.cat(concatenated, 1)
            relu1_out = relu_of_fresh(layer.relu1, layer.norm1(norm1_in))
            conv1_out = layer.conv1(relu1_out)
            relu2_out = relu_of_fresh(layer.relu2, layer.norm2(conv1_out))
            conv2_out = layer.conv2(relu2_out)
            acts.layers.append(DenseLayerActivations(relu1_out, conv1_out, relu2_out, conv2_out,
                                                     norm1_in if torch.is_grad_enabled() else None))
            concatenated.append(conv2_out)
        acts.output = torch.cat(concatenated, 1)
        if block.transition is not None:
            t = block.transition
            acts.post_relu_out = relu_of_fresh(t.relu, t.norm(acts.output))
            acts.transition_conv_out = t.conv(acts.post_relu_out)
            acts.transition_relu2_out = t.relu2(acts.transition_conv_out)
            features = t.pool(acts.transition_relu2_out)
        else:
            acts.post_relu_out = relu_of_fresh(f.fReLU, f.norm5(acts.output))
            features = f.AdaptPool(acts.post_relu_out)
        blocks.append(acts)
    pooled = features
    classifier_input = torch.flatten(pooled, 1)
    if plan.classifier_pre is not None:
        classifier_input = plan.classifier_pre(classifier_input)
    y = plan.classifier(classifier_input)
    return Activations(x, conv0_out, relu0_out, pool0_indices, blocks, pooled, classifier_input, y)
