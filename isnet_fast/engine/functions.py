"""The torch ops' autograd Functions: the original's overwriting un-pooling, whose gradient is not
its forward's adjoint, and the epsilon steps under autograd with their backward passes written
out. The slow, obviously-correct versions are the formulas themselves (``torch_ops`` keeps them
for mixed dtypes; ``tests/test_autograd_functions.py`` compares the two)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def channels_last_view(t: torch.Tensor) -> torch.Tensor:
    """``... x ch x H x W`` -> ``... x H x W x ch`` (a view)."""
    return t.movedim(-3, -1)


def channels_first_view(t: torch.Tensor) -> torch.Tensor:
    """The inverse of ``channels_last_view``."""
    return t.movedim(-1, -3)


def _pixels_last(t: torch.Tensor) -> torch.Tensor:
    """``... x ch x H x W`` -> ``... x (H W) x ch``, a view for channels_last tensors."""
    return t.movedim(-3, -1).flatten(-3, -2)


def _gather_pixels(source: torch.Tensor, pixel_index: torch.Tensor, classes: int) -> torch.Tensor:
    """``out[b, c, p, ch] = source[b, c, pixel_index[b, ch, p], ch]``, on pixels-last views.

    ``source`` is ``B x C x P x ch``, ``pixel_index`` ``B x ch x Q`` (shared by the classes).
    """
    batch, channels, count = pixel_index.shape
    index = pixel_index.transpose(1, 2).unsqueeze(1).expand(batch, classes, count, channels)
    return source.gather(2, index)


def overwritten_positions(indices: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """Which pooled positions the original's un-pooling overwrites: those whose chosen pixel a
    later pooled position (raster order) chose too. Bool, the shape of ``indices``.

    Only positions whose windows overlap can share a pixel (``kernel_size`` and ``stride`` of a
    square pool, dilation 1), so a few shifted comparisons at the pooled resolution say it all;
    no full-size index tensor.
    """
    height, width = indices.shape[-2:]
    reach = -(-kernel_size // stride) - 1  # how many positions apart two windows can still overlap
    # Counted in uint8 and padded back to full size, out of place: torch.compile's CPU code
    # generation fails on a boolean OR over padded or sliced-in-place comparisons.
    later_choosers = torch.zeros(indices.shape, dtype=torch.uint8, device=indices.device)
    for down in range(reach + 1):
        for across in range(-reach, reach + 1):
            if (down, across) <= (0, 0) or down >= height or abs(across) >= width:
                continue  # not later in raster order, or off the map
            first, last = max(0, -across), width - max(0, across)
            same = indices[..., :height - down, first:last] == indices[..., down:, first + across:last + across]
            later_choosers = later_choosers + F.pad(same.to(torch.uint8), (first, width - last, 0, down))
    return later_choosers > 0


def max_unpool_sum_pixels(relevance: torch.Tensor, indices: torch.Tensor, input_hw: tuple) -> torch.Tensor:
    """Adds each pooled position's relevance (``B x C x ch x h x w``) into the pixel it chose,
    with the channels last; ``B x C x (H W) x ch``. Deterministic on the CPU."""
    batch, classes, channels = relevance.shape[:3]
    pooled = _pixels_last(relevance)
    chosen = _pixels_last(indices).unsqueeze(1).expand_as(pooled)
    out = pooled.new_zeros(batch, classes, input_hw[0] * input_hw[1], channels)
    return out.scatter_add_(2, chosen, pooled)


class MaxUnpoolOverwrite(torch.autograd.Function):
    """Un-pools relevance ``B x C x ch x h x w`` to the pool's input size, classes broadcast.

    Forward: each input pixel takes the relevance of the last pooled position (raster order) that
    chose it, as the original's CPU ``max_unpool2d`` leaves it: the overwritten positions' values
    are zeroed (``overwritten_positions``) and the rest summed into their pixels, one each.
    Backward: every pooled position gets the gradient at the pixel it chose, overwritten or not,
    which is what autograd gives the original's ``max_unpool2d`` (a gather).
    Both work with the channels last, so channels_last tensors stay so.
    """

    @staticmethod
    def forward(ctx, relevance, indices, input_hw, kernel_size, stride):
        batch, classes, channels, pooled_h, pooled_w = relevance.shape
        survivors = relevance.masked_fill(overwritten_positions(indices, kernel_size, stride).unsqueeze(1), 0)
        out = max_unpool_sum_pixels(survivors, indices, input_hw)
        ctx.save_for_backward(indices)
        ctx.pooled_hw = (pooled_h, pooled_w)
        return out.view(batch, classes, *input_hw, channels).movedim(-1, -3)

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        batch, classes, channels = grad_out.shape[:3]
        flat_indices = indices.reshape(batch, channels, -1)
        grad = _gather_pixels(_pixels_last(grad_out), flat_indices, classes)
        return grad.view(batch, classes, *ctx.pooled_hw, channels).movedim(-1, -3), None, None, None, None


def max_unpool_overwrite(relevance, indices, input_hw, kernel_size, stride):
    return MaxUnpoolOverwrite.apply(relevance, indices, tuple(input_hw), kernel_size, stride)


# ---------------------------------------------------------------------------------------------
# The epsilon step under autograd, with its gradient written out: the generic graph of the
# formula's dozen elementwise ops keeps as many temporaries and takes about twice the passes
# over memory in backward. Shapes and layouts as in ``torch_ops`` (channels-last views inside).
# ---------------------------------------------------------------------------------------------

def stabilized(z: torch.Tensor, e: float) -> torch.Tensor:
    """z + e * sign(z) with sign(0) = +1 (-0.0 counted as 0), in a new tensor. The sign term is a
    constant for autograd: the backward passes straight through to z."""
    # sign(sign(z) + 1/2) maps -1, 0 (either zero) and +1 to -1, +1, +1: all in place on one new
    # tensor, vectorised passes (torch.where's CPU loop is not vectorised, and was about eight
    # times slower here), without an ``out=`` that torch.compile refuses on channels-last views.
    # Times e: exactly e or -e in z's dtype.
    sign_term = torch.sign(z.detach()).add_(0.5).sign_().mul_(e)
    return sign_term.add_(z)


def _map_sum_of_products(grad: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """sum over the maps (dim 1) of grad * rel, on channels-last views: one pass per map into a
    per-image tensor, never a map-sized temporary."""
    total = grad[:, 0] * rel[:, 0]
    for m in range(1, grad.shape[1]):
        total.addcmul_(grad[:, m], rel[:, m])
    return total


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all but the last (channel) dimension of a channels-last view."""
    return t.sum(dim=tuple(range(t.dim() - 1)))


class GatedProduct(torch.autograd.Function):
    """``rel * act * scale / stab(pre * scale + shift)`` (without a fold ``rel * act / stab(pre)``),
    the gate broadcast over the maps; see ``torch_ops.gated_product``. Forward computes what the
    formula's ops compute, in the same order; it saves the gate and its denominator for backward."""

    @staticmethod
    def forward(ctx, rel, act, pre, scale, shift, e):
        act_v, pre_v = channels_last_view(act), channels_last_view(pre)
        if scale is None:
            denominator = stabilized(pre_v, e)
            gate = act_v / denominator
        else:
            denominator = stabilized(pre_v * scale + shift, e)
            gate = (act_v * scale).div_(denominator)
        ctx.save_for_backward(rel, act, pre, scale, gate, denominator)
        return channels_first_view(channels_last_view(rel) * gate.unsqueeze(1))

    @staticmethod
    def backward(ctx, grad_out):
        rel, act, pre, scale, gate, denominator = ctx.saved_tensors
        grad_out_v = channels_last_view(grad_out)
        grad_rel = grad_act = grad_pre = grad_scale = grad_shift = None
        if ctx.needs_input_grad[0]:
            grad_rel = channels_first_view(grad_out_v * gate.unsqueeze(1))
        if any(ctx.needs_input_grad[1:5]):
            # q = dL/dgate / den; the denominator's gradient is -q * gate, the pre-activation's
            # that times the fold's scale
            q = _map_sum_of_products(grad_out_v, channels_last_view(rel)).div_(denominator)
            through_denominator = q * gate
            if scale is not None:
                act_v, pre_v = channels_last_view(act), channels_last_view(pre)
                if ctx.needs_input_grad[3]:
                    grad_scale = _channel_sum(q * act_v - through_denominator * pre_v)
                if ctx.needs_input_grad[4]:
                    grad_shift = _channel_sum(through_denominator).neg_()
            if ctx.needs_input_grad[1]:
                grad_act = channels_first_view(q if scale is None else q.mul_(scale))
            if ctx.needs_input_grad[2]:
                grad_pre = through_denominator if scale is None else through_denominator.mul_(scale)
                grad_pre = channels_first_view(grad_pre.neg_())
        return grad_rel, grad_act, grad_pre, grad_scale, grad_shift, None


class ResidualSplitGated(torch.autograd.Function):
    """``rel * out * part / stab(total) * scale / stab(pre * scale + shift)``, the gate broadcast over
    the maps; see ``torch_ops.residual_split_gated``. Forward runs the formula's ops in their order;
    it saves the gate and both denominators for backward."""

    @staticmethod
    def forward(ctx, rel, out, total, part, pre, scale, shift, e):
        out_v, total_v, part_v, pre_v = (channels_last_view(t) for t in (out, total, part, pre))
        share_denominator = stabilized(total_v, e)
        fold_denominator = stabilized(pre_v * scale + shift, e)
        gate = (out_v * part_v).div_(share_denominator).mul_(scale).div_(fold_denominator)
        ctx.save_for_backward(rel, out, part, pre, scale, gate, share_denominator, fold_denominator)
        return channels_first_view(channels_last_view(rel) * gate.unsqueeze(1))

    @staticmethod
    def backward(ctx, grad_out):
        rel, out, part, pre, scale, gate, share_denominator, fold_denominator = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_out_v = channels_last_view(grad_out)
        grads = [None] * 8
        if needs[0]:
            grads[0] = channels_first_view(grad_out_v * gate.unsqueeze(1))
        if not any(needs[1:7]):
            return tuple(grads)
        out_v, part_v, pre_v = (channels_last_view(t) for t in (out, part, pre))
        grad_gate = _map_sum_of_products(grad_out_v, channels_last_view(rel))
        # the gate is out * part * scale / (d1 d2): over each denominator d its gradient is
        # -grad_gate * gate / d; over out, part and the direct scale u * (the other two)
        through_denominators = grad_gate * gate
        per_unit = grad_gate.div_(share_denominator).div_(fold_denominator)
        if needs[2]:
            grads[2] = channels_first_view(through_denominators / share_denominator).neg_()
        through_fold = through_denominators.div_(fold_denominator)
        if needs[1]:
            grads[1] = channels_first_view((per_unit * part_v).mul_(scale))
        times_out = per_unit.mul_(out_v)
        if needs[5]:
            grads[5] = _channel_sum(times_out * part_v) - _channel_sum(through_fold * pre_v)
        if needs[3]:
            grads[3] = channels_first_view(times_out.mul_(scale))
        if needs[6]:
            grads[6] = _channel_sum(through_fold).neg_()
        if needs[4]:
            grads[4] = channels_first_view(through_fold.mul_(scale).neg_())
        return tuple(grads)


class ResidualShortcutAdd(torch.autograd.Function):
    """``back + rel * out / stab(total)``, the gate broadcast over the maps; see
    ``torch_ops.residual_shortcut_add``. Saves the gate and its denominator for backward."""

    @staticmethod
    def forward(ctx, back, rel, out, total, e):
        denominator = stabilized(channels_last_view(total), e)
        gate = channels_last_view(out) / denominator
        ctx.save_for_backward(rel, gate, denominator)
        return channels_first_view(channels_last_view(back) + channels_last_view(rel) * gate.unsqueeze(1))

    @staticmethod
    def backward(ctx, grad_out):
        rel, gate, denominator = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_out_v = channels_last_view(grad_out)
        grad_back = grad_out if needs[0] else None
        grad_rel = channels_first_view(grad_out_v * gate.unsqueeze(1)) if needs[1] else None
        grad_out_act = grad_total = None
        if needs[2] or needs[3]:
            per_unit = _map_sum_of_products(grad_out_v, channels_last_view(rel)).div_(denominator)
            if needs[3]:
                grad_total = channels_first_view(per_unit * gate).neg_()
            if needs[2]:
                grad_out_act = channels_first_view(per_unit)
        return grad_back, grad_rel, grad_out_act, grad_total, None
