"""The LRP rules every architecture's pass shares: BatchNorm folds (with the batch statistics
of training), the transposed convolutions, and the input layer's z^B / epsilon terms.

A BatchNorm is folded into the convolution before it as the references do: gamma with
gradient; beta and the statistics detached; in training the batch mean and the *unbiased*
batch variance of its input.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ZB_LOW, ZB_HIGH = 0.0, 1.0  # the z^B rule's pixel bounds, as in the original


def batch_statistics(batch_input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Detached per-channel batch mean and *unbiased* variance, as the original folds them."""
    # Two passes (mean, then the centred squares): as exact as torch.var_mean, and on the CPU
    # about ten times faster.
    # Under autocast (bf16/fp16 activations) both are taken in float32.
    batch_input = batch_input.detach()
    dtype = torch.float32 if batch_input.dtype in (torch.float16, torch.bfloat16) else batch_input.dtype
    mean = batch_input.mean(dim=(0, 2, 3), dtype=dtype)
    centred = batch_input - mean.view(1, -1, 1, 1)
    count = batch_input.numel() // batch_input.shape[1]
    var = centred.mul_(centred).sum(dim=(0, 2, 3)) / (count - 1)
    return mean, var


def batchnorm_fold(bn: nn.BatchNorm2d, batch_input: torch.Tensor = None,
                   statistics: Tuple[torch.Tensor, torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of a BatchNorm folded into the linear map before it.

    Statistics are detached, as is beta; gamma is not. In training they are the batch mean and
    unbiased variance of the BatchNorm's input: ``statistics`` (of a wider tensor whose first
    channels are that input) when given, else those of ``batch_input``.
    """
    if bn.training:
        mean, var = statistics if statistics is not None else batch_statistics(batch_input)
        # float32 statistics of low-precision activations: kept so under autocast (float32
        # parameters), back in the parameters' dtype for a model converted to bf16/fp16
        mean, var = mean[:bn.num_features].to(bn.weight.dtype), var[:bn.num_features].to(bn.weight.dtype)
    else:
        mean, var = bn.running_mean.detach(), bn.running_var.detach()
    std = torch.sqrt(var + bn.eps)
    scale = bn.weight / std
    shift = bn.weight * (-mean / std) + bn.bias.detach()
    return scale, shift


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False


def conv_transpose(conv: nn.Conv2d, relevance: torch.Tensor, input_hw, weight: torch.Tensor = None) -> torch.Tensor:
    """Transposed ``conv`` of ``relevance`` (N x out x h x w), sized back to its input ``input_hw``.

    The output padding restores sizes that strided convolutions round down, so any input size
    the DenseNet accepts works (the original's fixed padding needs multiples of 32).
    """
    weight = conv.weight if weight is None else weight
    if relevance.dtype != weight.dtype and not _autocast_enabled(relevance.device.type):
        relevance = relevance.to(weight.dtype)  # a model converted to bf16/fp16: float32 output relevance
    output_padding = []
    for dim in range(2):
        k, s, p, d = conv.kernel_size[dim], conv.stride[dim], conv.padding[dim], conv.dilation[dim]
        natural = (relevance.shape[2 + dim] - 1) * s - 2 * p + d * (k - 1) + 1
        output_padding.append(input_hw[dim] - natural)
    return F.conv_transpose2d(relevance, weight, stride=conv.stride, padding=conv.padding,
                              output_padding=tuple(output_padding), dilation=conv.dilation, groups=conv.groups)


def is_forward_fold(bn: nn.BatchNorm2d) -> bool:
    """Whether the fold is the BatchNorm the forward applied (eval mode: its running statistics),
    so that the ReLU after it is the ReLU of the fold's pre-activation (see
    ``torch_ops.gated_product``). In training the fold's unbiased variance differs from the
    biased one the BatchNorm normalised with."""
    return not bn.training


def autocast_to(dtype: torch.dtype, device_type: str) -> bool:
    """Whether torch.autocast is on for ``device_type`` and computes in ``dtype``."""
    try:
        return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == dtype
    except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
        return False


def input_layer_terms(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, conv_out: torch.Tensor, zb: bool):
    """The input layer's (a conv with its BatchNorm folded) rule: its stabilised denominator's
    pre-activation ``z``, the weights to transpose (concatenated along the input channels) and
    the coefficients ``ops.input_rule`` subtracts their extra parts with. The epsilon rule
    without ``zb``; with it z^B over the pixel bounds ZB_LOW and ZB_HIGH. Shared by the
    DenseNet's stem and the ResNet's."""
    scale, shift = batchnorm_fold(bn, conv_out)
    z = conv_out * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    weights, coefficients = [weight], []
    if zb:
        # z^B: subtract what the pixel bounds would give through the weights' clipped parts
        ones = torch.ones_like(x[:1])  # in x's memory format
        for bound, clip in ((ZB_LOW, torch.clamp_min), (ZB_HIGH, torch.clamp_max)):
            if bound != 0:
                clipped_weight, clipped_shift = clip(weight, 0), clip(shift, 0)
                z = z - F.conv2d(ones * bound, clipped_weight, clipped_shift * bound,
                                 conv.stride, conv.padding, conv.dilation)
                weights.append(clipped_weight)
                coefficients.append(bound)
    return z, weights, coefficients


def relu_of_fresh(relu: nn.ReLU, normalised: torch.Tensor) -> torch.Tensor:
    """``relu(normalised)`` for a BatchNorm's output that nothing else reads. Without autograd
    (and without hooks on the module) it is computed in place: one allocation fewer per layer,
    and fresh memory costs the CPU page faults."""
    if torch.is_grad_enabled() or relu._forward_hooks or relu._forward_pre_hooks:
        return relu(normalised)
    return torch.relu_(normalised)


def check_image_batch(x: torch.Tensor, first_conv: nn.Conv2d) -> None:
    """Raises a ValueError or TypeError that says what is wrong with a batch of images for a
    network whose first layer is ``first_conv``, and how to fix it (every architecture's input check)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D batch of images (B x 3 x H x W), got a tensor of shape {tuple(x.shape)}; "
                         "add a batch dimension with x.unsqueeze(0)")
    if x.shape[0] == 0:
        raise ValueError(f"the batch is empty (shape {tuple(x.shape)}): B must be at least 1")
    expected = first_conv.in_channels
    if x.shape[1] != expected:
        raise ValueError(f"expected {expected} input channels, got {x.shape[1]} (shape {tuple(x.shape)}); "
                         "images must be B x C x H x W with C first")
    if not torch.is_floating_point(x):
        raise TypeError(f"expected floating-point images, got {x.dtype}; convert with x.float() (scale to [0, 1])")
    weight = first_conv.weight
    if x.dtype != weight.dtype and not autocast_to(x.dtype, x.device.type):
        # The parameters' dtype: under torch.autocast an input of the model's dtype works, and so
        # does one already of autocast's dtype (which autocast computes in).
        raise TypeError(f"the images are {x.dtype} but the model's parameters are {weight.dtype}; "
                        f"convert the images with x.to({weight.dtype}) or the model with model.to({x.dtype})")
    if x.device != weight.device:
        raise ValueError(f"the images are on {x.device} but the model is on {weight.device}; "
                         f"move them with x.to('{weight.device}') or the model with model.to('{x.device}')")


def check_finite_images(x: torch.Tensor, wrapper: str) -> None:
    """Rejects images holding NaN or Inf (one device sync), naming the first bad one: in training
    their batch statistics would turn every image's outputs, and the BatchNorms' running
    statistics, into NaN. Left out inside ``torch.compile``, where the host sync would split the
    graph. ``wrapper`` names the class whose ``check_finite=False`` skips it."""
    if torch.compiler.is_compiling():
        return
    finite = torch.isfinite(x).flatten(1).all(1)
    if not bool(finite.all()):  # the one sync; the rest only on the error path
        bad = (~finite).nonzero().flatten()
        raise ValueError(f"image {int(bad[0])} of the batch holds NaN or Inf pixels ({bad.numel()} of "
                         f"{x.shape[0]} images do); clean the data, e.g. torch.nan_to_num(x), or drop them "
                         f"({wrapper}(..., check_finite=False) skips this check)")
