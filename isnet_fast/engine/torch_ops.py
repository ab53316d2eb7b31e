"""The relevance pass's elementwise steps in plain torch ops: the CPU backend, and the
obviously-correct versions the Triton kernels are tested against.

Shapes: relevance ``B x C x ch x H x W`` (one per class); activations ``B x ch x H x W``;
BatchNorm folds ``ch``. Every step multiplies the relevance by a class-independent gate.

The arithmetic runs on views with the channels last (``... x H x W x ch``). For channels_last
activations (what ``IsDenseFast`` uses on the CPU, where oneDNN's convolutions are fastest in
that layout) these views are contiguous, so every result, and every gradient autograd
computes for them, stays channels_last without a copy. Any other layout gives the same
numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .functions import (GatedProduct, ResidualShortcutAdd, ResidualSplitGated, channels_first_view, channels_last_view,
                        max_unpool_overwrite, max_unpool_sum_pixels, stabilized)


# z + e * sign(z), with sign(0) = +1, with or without autograd: the ops modules' name for it
stabilize = stabilized


def merge_batch_and_classes(t: torch.Tensor) -> torch.Tensor:
    """``B x C x ...`` -> ``(B C) x ...``, a view that keeps the batch stride canonical.

    Merging a size-one dimension by ``reshape`` gives the merged dimension a small stride, and
    torch then reads a channels_last tensor as NCHW (its convolutions and interpolations return
    NCHW); squeezing keeps the stride that is there.
    """
    if t.shape[1] == 1:
        return t.squeeze(1)
    if t.shape[0] == 1:
        return t.squeeze(0)
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def split_batch_and_classes(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``(B C) x ...`` -> ``B x C x ...``, the inverse of ``merge_batch_and_classes``; for a
    size-one B or C by unsqueezing, whose backward (a squeeze) keeps gradients' strides."""
    classes = t.shape[0] // batch
    if classes == 1:
        return t.unsqueeze(1)
    if batch == 1:
        return t.unsqueeze(0)
    return t.view(batch, classes, *t.shape[1:])


def _records_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _gate(act, pre, scale, shift, e):
    """On channels-last views: act * scale / stab(pre * scale + shift); without a fold, act / stab(pre)."""
    if _records_graph(act, pre, scale, shift):
        if scale is None:
            return act / stabilize(pre, e)
        return act * scale / stabilize(pre * scale + shift, e)
    # Without autograd the same operations in the same order, in place on temporaries: a third of
    # the allocations (and of the page faults on fresh memory, a large part of this step on the CPU).
    if scale is None:
        denominator = stabilized(pre, e)
        return torch.div(act, denominator, out=denominator)
    z = (pre * scale).add_(shift)
    denominator = stabilized(z, e)
    return torch.mul(act, scale, out=z).div_(denominator)


def _relu_gate(act, scale, e):
    """The gate where ``act`` is the ReLU of the stabilised pre-activation itself, without autograd:
    act * scale / (act + e). Where act > 0 it equals z (so stab(z) = act + e); where act = 0 the
    gate is 0 whatever z is. It reads neither ``pre`` nor the fold's shift: three passes, not nine."""
    denominator = act + e
    gate = torch.div(act, denominator, out=denominator)
    return gate if scale is None else gate.mul_(scale)


def _gate_for(act, pre, scale, shift, e, act_is_relu):
    act, pre = channels_last_view(act), channels_last_view(pre)
    if act_is_relu and not _records_graph(act, pre, scale, shift):
        return _relu_gate(act, scale, e)
    return _gate(act, pre, scale, shift, e)


def gated_product(rel, act, pre, scale, shift, e, act_is_relu=False):
    """Epsilon step: rel (one per class) times the gate.

    ``act_is_relu`` says that ``act`` is the ReLU of ``pre * scale + shift`` itself (an eval-mode
    BatchNorm's fold, or no fold): without autograd the gate is then computed from ``act`` alone.
    With autograd the full formula runs, so the gradients are the original's (its fold's shift,
    unlike the BatchNorm's, is detached).
    """
    if _records_graph(rel, act, pre, scale, shift) and _one_dtype(rel, act, pre, scale, shift):
        return GatedProduct.apply(rel, act, pre, scale, shift, e)  # the same numbers, a leaner backward
    product = channels_last_view(rel) * _gate_for(act, pre, scale, shift, e, act_is_relu).unsqueeze(1)
    return channels_first_view(product)


def gated_accumulate_(out, rel, act, pre, scale, shift, e, act_is_relu=False):
    """out += gated_product(...), in place (no autograd)."""
    channels_last_view(out).addcmul_(channels_last_view(rel),
                                     _gate_for(act, pre, scale, shift, e, act_is_relu).unsqueeze(1))
    return out


def pool_spread(rel, act, pre, e, act_is_relu=False):
    """2x2 average-pool spreading of rel (B x C x ch x h x w) times act / (4 stab(pre)).

    Rows and columns the pool dropped (odd sizes) get none. ``act_is_relu`` as in ``gated_product``
    (act = relu(pre)).
    """
    batch, classes, channels, h, w = rel.shape
    height, width = act.shape[-2:]
    if act_is_relu and not _records_graph(act, pre):
        factor = channels_first_view(_relu_gate(channels_last_view(act), None, e)).div_(4.0)
    else:
        factor = act / (4.0 * stabilize(pre, e))
    # Nearest 2x upsampling spreads each value over its window; its backward (a window sum) is
    # much faster than that of a broadcast over split dimensions.
    spread = F.interpolate(merge_batch_and_classes(rel), scale_factor=2, mode="nearest")
    if (height, width) != (2 * h, 2 * w):  # padded on a channels-last view, which keeps that layout
        spread = channels_first_view(F.pad(channels_last_view(spread), (0, 0, 0, width - 2 * w, 0, height - 2 * h)))
    spread = split_batch_and_classes(spread, batch)
    return channels_first_view(channels_last_view(spread) * channels_last_view(factor).unsqueeze(1))


def max_unpool_sum(rel, indices, input_hw):
    """Un-pools rel (B x C x ch x h x w) as the LRP rules read: each pooled position's relevance
    is added into the input pixel it chose (``indices``, max_pool2d's, shared by the classes).

    A scatter-add over the flattened pixels, with the channels last (so channels_last tensors
    stay so): the adjoint of max-pool's gather, and autograd's backward of it is that gather.
    Deterministic on the CPU; on CUDA torch's scatter-add sums with atomics, in no fixed order.
    """
    batch, classes, channels = rel.shape[:3]
    unpooled = max_unpool_sum_pixels(rel, indices, input_hw)
    return channels_first_view(unpooled.view(batch, classes, *input_hw, channels))


def max_unpool_gated(rel, indices, act, z, e, kernel_size, stride, padding, overwrite=True):
    """Un-pools rel, times act / stab(z): with ``overwrite`` by the original's rule (where several
    pooled positions chose a pixel the last one in raster order wins, see
    ``functions.MaxUnpoolOverwrite``), else summing them (``max_unpool_sum``). The square pool's
    ``kernel_size`` and ``stride`` (dilation 1) say which positions can share a pixel; ``padding``
    is not needed (the indices are the input's)."""
    input_hw = tuple(act.shape[-2:])
    if overwrite:
        unpooled = max_unpool_overwrite(rel, indices, input_hw, kernel_size, stride)
    else:
        unpooled = max_unpool_sum(rel, indices, input_hw)
    gate = _gate(channels_last_view(act), channels_last_view(z), None, None, e).unsqueeze(1)
    if _records_graph(unpooled, gate):
        return channels_first_view(channels_last_view(unpooled) * gate)
    return channels_first_view(channels_last_view(unpooled).mul_(gate))  # a fresh tensor: in place


def input_rule(back, x, coefficients=()):
    """x * back[:, :, :CIN] - sum_k coefficients[k] * back[:, :, (k+1) CIN:(k+2) CIN]."""
    channels = x.shape[1]
    back = channels_last_view(back)
    heat = back[..., :channels] * channels_last_view(x).unsqueeze(1)
    for k, coefficient in enumerate(coefficients, start=1):
        heat = heat - coefficient * back[..., k * channels:(k + 1) * channels]
    return channels_first_view(heat)


# ---------------------------------------------------------------------------------------------
# The ResNet's residual sum (``isnet_fast.engine.resnet.relevance``). With ``s = a + b`` (the shortcut
# ``a`` and the branch ``b``, before the post-sum ReLU ``out = relu(s)``) and relevance
# ``out * rel`` at the block's output, the shortcut gets ``out * rel * a / stab(s)`` and the
# branch ``out * rel * b / stab(s)``; each is consumed by an epsilon step (or, for an identity
# shortcut, added to the block input's factor) in the same pass.
# ---------------------------------------------------------------------------------------------

def _one_dtype(*tensors) -> bool:
    """Whether in-place steps keep the dtype the formula's type promotion gives."""
    return len({t.dtype for t in tensors if t is not None}) == 1


def _share_denominator(out, total, e, out_is_relu):
    """stab(total) in a new tensor, without autograd; from ``out`` alone when out = relu(total):
    out + e equals total + e where total > 0, and where total <= 0 out = 0 zeroes the share either way."""
    return out + e if out_is_relu else stabilized(total, e)


def residual_split_gated(rel, out, total, part, pre, scale, shift, e, out_is_relu=False, part_is_fold=False):
    """One side's share of the residual sum times the gate of the BatchNorm-folded conv that made it:
    ``rel * out * part / stab(total) * scale / stab(pre * scale + shift)``.

    ``part`` is the branch's last BatchNorm output (or the downsample BatchNorm's), ``pre`` the
    conv output it normalised, ``scale``/``shift`` that BatchNorm's fold; the result is what the
    conv's transposed convolution takes. All of ``out``, ``total``, ``part`` carry gradients.
    Hints, used only without autograd: ``out_is_relu`` (out = relu(total)) gives the same numbers
    without reading ``total``; ``part_is_fold`` (an eval-mode BatchNorm: part is pre * scale +
    shift up to rounding) divides by stab(part) instead, without reading ``pre`` or ``shift``.
    """
    if _records_graph(rel, out, total, part, pre, scale, shift) and _one_dtype(rel, out, total, part, pre, scale, shift):
        return ResidualSplitGated.apply(rel, out, total, part, pre, scale, shift, e)  # a leaner backward
    out, total, part, pre = (channels_last_view(t) for t in (out, total, part, pre))
    if _records_graph(rel, out, total, part, pre, scale, shift) or not _one_dtype(out, total, part, pre, scale, shift):
        gate = out * part / stabilize(total, e) * scale / stabilize(pre * scale + shift, e)
    else:  # the same operations in the same order, in place on temporaries
        gate = (out * part).div_(_share_denominator(out, total, e, out_is_relu)).mul_(scale)
        gate.div_(stabilized(part if part_is_fold else (pre * scale).add_(shift), e))
    return channels_first_view(channels_last_view(rel) * gate.unsqueeze(1))


def residual_shortcut_add(back, rel, out, total, e, out_is_relu=False):
    """An identity shortcut's share added to the branch's factor at the block input:
    ``back + rel * out / stab(total)`` (the shortcut is the block input itself, so its share of
    ``out * rel``, divided by that input, is ``rel * out / stab(total)``). ``out_is_relu`` as in
    ``residual_split_gated``."""
    if _records_graph(back, rel, out, total) and _one_dtype(back, rel, out, total):
        return ResidualShortcutAdd.apply(back, rel, out, total, e)  # a leaner backward
    out, total = channels_last_view(out), channels_last_view(total)
    if _records_graph(back, rel, out, total) or not _one_dtype(back, rel, out, total):
        gate = out / stabilize(total, e)
        return channels_first_view(channels_last_view(back) + channels_last_view(rel) * gate.unsqueeze(1))
    denominator = _share_denominator(out, total, e, out_is_relu)
    gate = torch.div(out, denominator, out=denominator)
    return channels_first_view((channels_last_view(rel) * gate.unsqueeze(1)).add_(channels_last_view(back)))
