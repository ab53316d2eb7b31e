"""Epsilon-rule step as a class-broadcast product, optionally accumulated in place.

    out[b, c, ch, p] (+)= rel[b, c, ch, p] * act[b, ch, p] * scale[ch] / stab(pre[b, ch, p] * scale[ch] + shift[ch])

``rel`` is the relevance coming back through a transposed convolution (one per class), ``act``
the activation at that convolution's input, ``pre`` the pre-activation the stabilised
denominator is built from, and (scale, shift) a BatchNorm folded into it (absent: 1 and 0).
It serves every conv -> BatchNorm -> ReLU and conv -> ReLU step, and the dense concatenation
split: with ``accumulate`` each consumer's quotient is added into the block-wide tensor that
the producers' transposed convolutions read, without a per-consumer temporary. The gate
(everything but ``rel``) is computed once per program and reused for every class.
"""

import torch
import triton
import triton.language as tl

from ._common import scalars, block_size, spatial_strides, stabilize, to_compute


@triton.jit
def _gate(act_ptrs, pre_ptrs, scale_ptr, shift_ptr, e_ptr, mask, HAS_FOLD: tl.constexpr, IS_FP64: tl.constexpr):
    """Loads one channel's lanes; returns act, pre, scale, the stabilised denominator and the gate
    act * scale / stab(pre * scale + shift) (scale 1 and shift 0 without a fold)."""
    e = to_compute(tl.load(e_ptr), IS_FP64)
    act = to_compute(tl.load(act_ptrs, mask=mask, other=0.0), IS_FP64)
    pre = to_compute(tl.load(pre_ptrs, mask=mask, other=0.0), IS_FP64)
    if HAS_FOLD:
        scale = to_compute(tl.load(scale_ptr), IS_FP64)
        denominator = stabilize(pre * scale + to_compute(tl.load(shift_ptr), IS_FP64), e)
    else:
        scale = to_compute(tl.full([], 1.0, tl.float32), IS_FP64)
        denominator = stabilize(pre, e)
    return act, pre, scale, denominator, act * scale / denominator


@triton.jit
def _gated_product_fwd_kernel(
    rel_ptr, act_ptr, pre_ptr, scale_ptr, shift_ptr, out_ptr,
    CLASSES, HW, e_ptr,
    rel_sb, rel_sc, rel_sch, rel_sp,
    act_sb, act_sch, act_sp,
    pre_sb, pre_sch, pre_sp,
    out_sb, out_sc, out_sch, out_sp,
    HAS_FOLD: tl.constexpr, ACCUMULATE: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_p = tl.program_id(0)
    ch = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    p = (pid_p * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = p < HW
    act, pre, scale, denominator, gate = _gate(
        act_ptr + b * act_sb + ch * act_sch + p * act_sp, pre_ptr + b * pre_sb + ch * pre_sch + p * pre_sp,
        scale_ptr + ch, shift_ptr + ch, e_ptr, mask, HAS_FOLD, IS_FP64)
    rel_base = rel_ptr + b * rel_sb + ch * rel_sch + p * rel_sp
    out_base = out_ptr + b * out_sb + ch * out_sch + p * out_sp
    for c in range(CLASSES):
        rel = to_compute(tl.load(rel_base + c * rel_sc, mask=mask, other=0.0), IS_FP64)
        value = rel * gate
        if ACCUMULATE:
            value += to_compute(tl.load(out_base + c * out_sc, mask=mask, other=0.0), IS_FP64)
        tl.store(out_base + c * out_sc, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_product_bwd_kernel(
    grad_out_ptr, rel_ptr, act_ptr, pre_ptr, scale_ptr, shift_ptr,
    grad_rel_ptr, grad_act_ptr, grad_pre_ptr, partial_scale_ptr, partial_shift_ptr,
    CLASSES, HW, CHANNELS, e_ptr,
    go_sb, go_sc, go_sch, go_sp,
    rel_sb, rel_sc, rel_sch, rel_sp,
    act_sb, act_sch, act_sp,
    pre_sb, pre_sch, pre_sp,
    HAS_FOLD: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    # grad_rel is contiguous B x C x CH x HW; grad_act, grad_pre contiguous B x CH x HW;
    # partial sums for the fold's gradients are B x P_BLOCKS x CH, reduced by the launcher.
    pid_p = tl.program_id(0)
    ch = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    p = (pid_p * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = p < HW
    act, pre, scale, denominator, gate = _gate(
        act_ptr + b * act_sb + ch * act_sch + p * act_sp, pre_ptr + b * pre_sb + ch * pre_sch + p * pre_sp,
        scale_ptr + ch, shift_ptr + ch, e_ptr, mask, HAS_FOLD, IS_FP64)
    # q = sum over classes of grad_out * rel: all the class-independent gradients need.
    q = tl.zeros([BLOCK], dtype=gate.dtype)
    grad_rel_base = grad_rel_ptr + (b * CLASSES * CHANNELS + ch) * HW + p
    for c in range(CLASSES):
        grad_out = to_compute(tl.load(grad_out_ptr + b * go_sb + c * go_sc + ch * go_sch + p * go_sp,
                                      mask=mask, other=0.0), IS_FP64)
        rel = to_compute(tl.load(rel_ptr + b * rel_sb + c * rel_sc + ch * rel_sch + p * rel_sp,
                                 mask=mask, other=0.0), IS_FP64)
        tl.store(grad_rel_base + c * CHANNELS * HW, (grad_out * gate).to(grad_rel_ptr.dtype.element_ty), mask=mask)
        q += grad_out * rel
    q = tl.where(mask, q, 0.0)
    # out = rel * act * scale / D(z), z = pre * scale + shift, dD/dz = 1
    grad_z = -q * gate / denominator
    offset = (b * CHANNELS + ch) * HW + p
    tl.store(grad_act_ptr + offset, (q * scale / denominator).to(grad_act_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_pre_ptr + offset, (grad_z * scale).to(grad_pre_ptr.dtype.element_ty), mask=mask)
    if HAS_FOLD:
        grad_scale = q * act / denominator + grad_z * pre
        partial = (b * tl.num_programs(0) + pid_p) * CHANNELS + ch
        tl.store(partial_scale_ptr + partial, tl.sum(tl.where(mask, grad_scale, 0.0), axis=0))
        tl.store(partial_shift_ptr + partial, tl.sum(grad_z, axis=0))


def gated_product_forward(rel, act, pre, scale, shift, e, out=None):
    """Launches the forward. ``rel``: B x C x CH x H x W (any strides with flattenable H, W);
    ``act``, ``pre``: B x CH x H x W; ``scale``, ``shift``: CH or None. With ``out`` given the
    result is added into it in place, else a new tensor is returned."""
    batch, classes, channels, height, width = rel.shape
    hw = height * width
    accumulate = out is not None
    if out is None:
        out = torch.empty((batch, classes, channels, height, width), dtype=rel.dtype, device=rel.device)
    has_fold = scale is not None
    if has_fold:
        scale, shift = scale.contiguous(), shift.contiguous()  # the kernel reads them at ch
    else:
        scale = shift = act  # unused pointers
    block = block_size(hw)
    grid = (triton.cdiv(hw, block), channels, batch)
    _gated_product_fwd_kernel[grid](
        rel, act, pre, scale, shift, out, classes, hw, scalars([e], rel),
        *spatial_strides(rel, 3), *spatial_strides(act, 2), *spatial_strides(pre, 2), *spatial_strides(out, 3),
        HAS_FOLD=has_fold, ACCUMULATE=accumulate, IS_FP64=rel.dtype == torch.float64, BLOCK=block,
    )
    return out


def gated_product_backward(grad_out, rel, act, pre, scale, shift, e):
    """Gradients with respect to rel, act, pre, and (when folded) scale and shift."""
    batch, classes, channels, height, width = rel.shape
    hw = height * width
    block = block_size(hw)
    p_blocks = triton.cdiv(hw, block)
    compute = torch.float64 if rel.dtype == torch.float64 else torch.float32
    grad_rel = torch.empty((batch, classes, channels, height, width), dtype=rel.dtype, device=rel.device)
    grad_act = torch.empty((batch, channels, height, width), dtype=act.dtype, device=act.device)
    grad_pre = torch.empty((batch, channels, height, width), dtype=pre.dtype, device=pre.device)
    has_fold = scale is not None
    if has_fold:
        scale, shift = scale.contiguous(), shift.contiguous()
    partial_scale = torch.empty((batch * p_blocks, channels), dtype=compute, device=rel.device)
    partial_shift = torch.empty_like(partial_scale)
    _gated_product_bwd_kernel[(p_blocks, channels, batch)](
        grad_out, rel, act, pre, scale if has_fold else act, shift if has_fold else act,
        grad_rel, grad_act, grad_pre, partial_scale, partial_shift, classes, hw, channels, scalars([e], rel),
        *spatial_strides(grad_out, 3), *spatial_strides(rel, 3), *spatial_strides(act, 2), *spatial_strides(pre, 2),
        HAS_FOLD=has_fold, IS_FP64=rel.dtype == torch.float64, BLOCK=block,
    )
    if not has_fold:
        return grad_rel, grad_act, grad_pre, None, None
    # Summing the per-program partials in a fixed order keeps the result bitwise reproducible.
    return (grad_rel, grad_act, grad_pre,
            partial_scale.sum(0).to(scale.dtype), partial_shift.sum(0).to(shift.dtype))
