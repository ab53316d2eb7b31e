"""The ResNet's residual sum: each side's share fused into the step that consumes it.

With ``total = a + b`` (the shortcut a and the branch b), ``out = relu(total)`` and the factor
``rel`` at the block's output (one per map), a side ``part`` (a or b) gets ``rel * out * part /
stab(total)``. Where that side is a conv -> BatchNorm (the branch's last one, or the
downsample), the conv's epsilon step follows at once, and the split is fused into it:

    split[b, m, ch, p] = rel[b, m, ch, p] * out * part / stab(total) * scale[ch] / stab(pre * scale[ch] + shift[ch])

(``pre`` the conv's output, (scale, shift) its BatchNorm folded; ``out``, ``total``, ``part``,
``pre`` at [b, ch, p]). An identity shortcut's share is added to the branch's factor at the
block input instead:

    add[b, m, ch, p] = back[b, m, ch, p] + rel[b, m, ch, p] * out / stab(total)

As in ``gated_product``, the gate (everything but the per-map tensors) is computed once per tile
and reused for every map, with one division per element; tiles follow the activations' layout
(``_common.tile_indices``), and so do the outputs and gradients. Two hints, forward only (the
backward takes the full formula): ``OUT_IS_RELU`` (out = relu(total), as the block's ReLU
makes it): stab(total) is out + e where total > 0, and where total <= 0 out = 0 zeroes the
share either way, so ``total`` is not read; ``PART_IS_FOLD`` (an eval-mode BatchNorm: part is
the fold's pre * scale + shift itself, up to rounding): stab(part) stands for the fold's
denominator, so neither ``pre`` nor ``shift`` is read.
"""

import torch
import triton
import triton.language as tl

from ._common import (MAX_REGISTERS, empty, grid, scalars, spatial_strides, stabilize, sum_over_pixels,
                      tile, tile_indices, to_compute, unwrapped)
from .gated_product import _layout, _per_channel


@triton.jit
def _tile(ptr, b, ch, p, mask, sb, sch, sp, IS_FP64: tl.constexpr):
    """A ``B x CH x HW`` tensor's values at this tile, in the compute dtype (0 where masked)."""
    return to_compute(tl.load(ptr + b * sb + ch * sch + p * sp, mask=mask, other=0.0), IS_FP64)


@triton.jit
def _share_denominator(out, total_ptr, e, b, ch, p, mask, total_sb, total_sch, total_sp,
                       OUT_IS_RELU: tl.constexpr, IS_FP64: tl.constexpr):
    """stab(total); from ``out`` alone (out + e) when out = relu(total) (see the module's docstring)."""
    if OUT_IS_RELU:
        return out + e
    else:
        return stabilize(_tile(total_ptr, b, ch, p, mask, total_sb, total_sch, total_sp, IS_FP64), e)


@triton.jit(do_not_specialize=["MAPS"])
def _residual_split_fwd_kernel(
    rel_ptr, out_ptr, total_ptr, part_ptr, pre_ptr, scale_ptr, shift_ptr, result_ptr, e_ptr,
    MAPS, CHANNELS, HW,
    rel_sb, rel_sm, rel_sch, rel_sp,
    out_sb, out_sch, out_sp,
    total_sb, total_sch, total_sp,
    part_sb, part_sch, part_sp,
    pre_sb, pre_sch, pre_sp,
    res_sb, res_sm, res_sch, res_sp,
    OUT_IS_RELU: tl.constexpr, PART_IS_FOLD: tl.constexpr, IS_FP64: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Traffic, in bytes per element (b, ch, p) per map, with M maps and s_x the element size of x:
    reads s_rel + (s_out + s_total + s_part + s_pre) / M, writes s_result; ``OUT_IS_RELU`` drops
    s_total, ``PART_IS_FOLD`` s_pre (and the shift). The minimum: every input the math needs read
    once, every output written once (the folds, CH values, aside)."""
    ch, p, _ = tile_indices(BLOCK_C, BLOCK_P, CHANNELS_LAST)
    b = tl.program_id(2).to(tl.int64)
    mask = (ch < CHANNELS) & (p < HW)
    e = to_compute(tl.load(e_ptr), IS_FP64)
    out = _tile(out_ptr, b, ch, p, mask, out_sb, out_sch, out_sp, IS_FP64)
    part = _tile(part_ptr, b, ch, p, mask, part_sb, part_sch, part_sp, IS_FP64)
    scale = _per_channel(scale_ptr, ch, p, mask, CHANNELS, IS_FP64, CHANNELS_LAST)
    share_denominator = _share_denominator(out, total_ptr, e, b, ch, p, mask, total_sb, total_sch, total_sp,
                                           OUT_IS_RELU, IS_FP64)
    if PART_IS_FOLD:
        fold_denominator = stabilize(part, e)
    else:
        pre = _tile(pre_ptr, b, ch, p, mask, pre_sb, pre_sch, pre_sp, IS_FP64)
        shift = _per_channel(shift_ptr, ch, p, mask, CHANNELS, IS_FP64, CHANNELS_LAST)
        fold_denominator = stabilize(pre * scale + shift, e)
    gate = out * part * scale / (share_denominator * fold_denominator)
    rel_ptrs = rel_ptr + b * rel_sb + ch * rel_sch + p * rel_sp
    res_ptrs = result_ptr + b * res_sb + ch * res_sch + p * res_sp
    for _ in range(MAPS):
        value = to_compute(tl.load(rel_ptrs, mask=mask, other=0.0), IS_FP64) * gate
        tl.store(res_ptrs, value.to(result_ptr.dtype.element_ty), mask=mask)
        rel_ptrs += rel_sm
        res_ptrs += res_sm


@triton.jit(do_not_specialize=["MAPS"])
def _residual_split_bwd_kernel(
    grad_result_ptr, rel_ptr, out_ptr, total_ptr, part_ptr, pre_ptr, scale_ptr, shift_ptr,
    grad_rel_ptr, grad_out_ptr, grad_total_ptr, grad_part_ptr, grad_pre_ptr, partial_scale_ptr, partial_shift_ptr,
    e_ptr,
    MAPS, CHANNELS, HW,
    gres_sb, gres_sm, gres_sch, gres_sp,
    rel_sb, rel_sm, rel_sch, rel_sp,
    out_sb, out_sch, out_sp,
    total_sb, total_sch, total_sp,
    part_sb, part_sch, part_sp,
    pre_sb, pre_sch, pre_sp,
    gr_sb, gr_sm, gr_sch, gr_sp,
    g_sb, g_sch, g_sp,
    IS_FP64: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Traffic, in bytes per element per map: reads s_grad_result + s_rel + (s_out + s_total +
    s_part + s_pre) / M, writes s_grad_rel + (s_out + s_total + s_part + s_pre) / M (their
    gradients, which share one set of strides). The minimum. The fold's gradients are per-tile
    partial sums (B x pixel blocks x CH in the compute dtype), summed by the launcher in a fixed
    order."""
    ch, p, ch_vector = tile_indices(BLOCK_C, BLOCK_P, CHANNELS_LAST)
    b = tl.program_id(2).to(tl.int64)
    mask = (ch < CHANNELS) & (p < HW)
    e = to_compute(tl.load(e_ptr), IS_FP64)
    out = _tile(out_ptr, b, ch, p, mask, out_sb, out_sch, out_sp, IS_FP64)
    part = _tile(part_ptr, b, ch, p, mask, part_sb, part_sch, part_sp, IS_FP64)
    pre = _tile(pre_ptr, b, ch, p, mask, pre_sb, pre_sch, pre_sp, IS_FP64)
    scale = _per_channel(scale_ptr, ch, p, mask, CHANNELS, IS_FP64, CHANNELS_LAST)
    shift = _per_channel(shift_ptr, ch, p, mask, CHANNELS, IS_FP64, CHANNELS_LAST)
    share_denominator = stabilize(_tile(total_ptr, b, ch, p, mask, total_sb, total_sch, total_sp, IS_FP64), e)
    fold_denominator = stabilize(pre * scale + shift, e)
    inverse = 1.0 / (share_denominator * fold_denominator)  # the one division
    gate = out * part * scale * inverse
    # q = sum over maps of grad_result * rel: all the map-independent gradients need.
    q = tl.zeros(gate.shape, dtype=gate.dtype)
    gres_ptrs = grad_result_ptr + b * gres_sb + ch * gres_sch + p * gres_sp
    rel_ptrs = rel_ptr + b * rel_sb + ch * rel_sch + p * rel_sp
    gr_ptrs = grad_rel_ptr + b * gr_sb + ch * gr_sch + p * gr_sp
    for _ in range(MAPS):
        grad_result = to_compute(tl.load(gres_ptrs, mask=mask, other=0.0), IS_FP64)
        rel = to_compute(tl.load(rel_ptrs, mask=mask, other=0.0), IS_FP64)
        tl.store(gr_ptrs, (grad_result * gate).to(grad_rel_ptr.dtype.element_ty), mask=mask)
        q += grad_result * rel
        gres_ptrs += gres_sm
        rel_ptrs += rel_sm
        gr_ptrs += gr_sm
    # gate = out * part * scale / (T * Z), T = stab(total), Z = stab(z), z = pre * scale + shift;
    # dT/dtotal = dZ/dz = 1 (the sign term is a constant)
    q_inverse = q * inverse
    q_gate = q * gate
    grad_total = -q_gate * fold_denominator * inverse  # -q * gate / T
    grad_z = tl.where(mask, -q_gate * share_denominator * inverse, 0.0)  # -q * gate / Z
    offset = b * g_sb + ch * g_sch + p * g_sp
    tl.store(grad_out_ptr + offset, (q_inverse * part * scale).to(grad_out_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_part_ptr + offset, (q_inverse * out * scale).to(grad_part_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_total_ptr + offset, grad_total.to(grad_total_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_pre_ptr + offset, (grad_z * scale).to(grad_pre_ptr.dtype.element_ty), mask=mask)
    grad_scale = tl.where(mask, q_inverse * out * part + grad_z * pre, 0.0)
    row = b * tl.num_programs(0) + tl.program_id(0)
    in_range = ch_vector < CHANNELS
    tl.store(partial_scale_ptr + row * CHANNELS + ch_vector, sum_over_pixels(grad_scale, CHANNELS_LAST), mask=in_range)
    tl.store(partial_shift_ptr + row * CHANNELS + ch_vector, sum_over_pixels(grad_z, CHANNELS_LAST), mask=in_range)


@triton.jit(do_not_specialize=["MAPS"])
def _residual_shortcut_add_fwd_kernel(
    back_ptr, rel_ptr, out_ptr, total_ptr, result_ptr, e_ptr,
    MAPS, CHANNELS, HW,
    back_sb, back_sm, back_sch, back_sp,
    rel_sb, rel_sm, rel_sch, rel_sp,
    out_sb, out_sch, out_sp,
    total_sb, total_sch, total_sp,
    res_sb, res_sm, res_sch, res_sp,
    OUT_IS_RELU: tl.constexpr, IS_FP64: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Traffic, in bytes per element per map: reads s_back + s_rel + (s_out + s_total) / M
    (``OUT_IS_RELU``: s_out / M), writes s_result. The minimum."""
    ch, p, _ = tile_indices(BLOCK_C, BLOCK_P, CHANNELS_LAST)
    b = tl.program_id(2).to(tl.int64)
    mask = (ch < CHANNELS) & (p < HW)
    e = to_compute(tl.load(e_ptr), IS_FP64)
    out = _tile(out_ptr, b, ch, p, mask, out_sb, out_sch, out_sp, IS_FP64)
    gate = out / _share_denominator(out, total_ptr, e, b, ch, p, mask, total_sb, total_sch, total_sp,
                                    OUT_IS_RELU, IS_FP64)
    back_ptrs = back_ptr + b * back_sb + ch * back_sch + p * back_sp
    rel_ptrs = rel_ptr + b * rel_sb + ch * rel_sch + p * rel_sp
    res_ptrs = result_ptr + b * res_sb + ch * res_sch + p * res_sp
    for _ in range(MAPS):
        back = to_compute(tl.load(back_ptrs, mask=mask, other=0.0), IS_FP64)
        rel = to_compute(tl.load(rel_ptrs, mask=mask, other=0.0), IS_FP64)
        tl.store(res_ptrs, (back + rel * gate).to(result_ptr.dtype.element_ty), mask=mask)
        back_ptrs += back_sm
        rel_ptrs += rel_sm
        res_ptrs += res_sm


@triton.jit(do_not_specialize=["MAPS"])
def _residual_shortcut_add_bwd_kernel(
    grad_result_ptr, rel_ptr, out_ptr, total_ptr, grad_rel_ptr, grad_out_ptr, grad_total_ptr, e_ptr,
    MAPS, CHANNELS, HW,
    gres_sb, gres_sm, gres_sch, gres_sp,
    rel_sb, rel_sm, rel_sch, rel_sp,
    out_sb, out_sch, out_sp,
    total_sb, total_sch, total_sp,
    gr_sb, gr_sm, gr_sch, gr_sp,
    g_sb, g_sch, g_sp,
    IS_FP64: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Gradients for rel, out and total (back's is grad_result itself: the launcher's caller
    passes it on). Traffic, in bytes per element per map: reads s_grad_result + s_rel +
    (s_out + s_total) / M, writes s_grad_rel + (s_out + s_total) / M. The minimum."""
    ch, p, _ = tile_indices(BLOCK_C, BLOCK_P, CHANNELS_LAST)
    b = tl.program_id(2).to(tl.int64)
    mask = (ch < CHANNELS) & (p < HW)
    e = to_compute(tl.load(e_ptr), IS_FP64)
    out = _tile(out_ptr, b, ch, p, mask, out_sb, out_sch, out_sp, IS_FP64)
    inverse = 1.0 / stabilize(_tile(total_ptr, b, ch, p, mask, total_sb, total_sch, total_sp, IS_FP64), e)
    gate = out * inverse
    q = tl.zeros(gate.shape, dtype=gate.dtype)
    gres_ptrs = grad_result_ptr + b * gres_sb + ch * gres_sch + p * gres_sp
    rel_ptrs = rel_ptr + b * rel_sb + ch * rel_sch + p * rel_sp
    gr_ptrs = grad_rel_ptr + b * gr_sb + ch * gr_sch + p * gr_sp
    for _ in range(MAPS):
        grad_result = to_compute(tl.load(gres_ptrs, mask=mask, other=0.0), IS_FP64)
        rel = to_compute(tl.load(rel_ptrs, mask=mask, other=0.0), IS_FP64)
        tl.store(gr_ptrs, (grad_result * gate).to(grad_rel_ptr.dtype.element_ty), mask=mask)
        q += grad_result * rel
        gres_ptrs += gres_sm
        rel_ptrs += rel_sm
        gr_ptrs += gr_sm
    # gate = out / T, T = stab(total), dT/dtotal = 1
    q_inverse = q * inverse
    offset = b * g_sb + ch * g_sch + p * g_sp
    tl.store(grad_out_ptr + offset, q_inverse.to(grad_out_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_total_ptr + offset, (-q_inverse * gate).to(grad_total_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _check_shapes(rel, activations, names):
    """rel is B x M x CH x H x W, each activation B x CH x H x W of the same B, CH, H, W."""
    if rel.dim() != 5:
        raise ValueError(f"rel must be B x M x CH x H x W, got shape {tuple(rel.shape)}")
    expected = (rel.shape[0], *rel.shape[2:])
    for name, t in zip(names, activations):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must be B x CH x H x W = {expected} (rel's B, CH, H, W), got {tuple(t.shape)}")


def _check_fold(scale, shift, channels):
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None or t.shape != (channels,):
            got = None if t is None else tuple(t.shape)
            raise ValueError(f"{name} must be the BatchNorm fold's {channels} per-channel values, got {got}")


def _result_dtype(*tensors):
    """The dtype torch's formula gives: all inputs promoted together."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _is_fp64(*tensors):
    return any(t.dtype == torch.float64 for t in tensors)


def _epsilon(e, tensors):
    """``e`` as a tensor in the kernel's compute dtype: float64 where any tensor is."""
    return scalars([e], next((t for t in tensors if t.dtype == torch.float64), tensors[0]))


def residual_split_forward(rel, out, total, part, pre, scale, shift, e, out_is_relu=False, part_is_fold=False,
                           wrap_triton=unwrapped):
    """``rel * out * part / stab(total) * scale / stab(pre * scale + shift)``, a new tensor in the
    activations' layout. ``rel``: B x M x CH x H x W (any strides with flattenable H, W); ``out``,
    ``total``, ``part``, ``pre``: B x CH x H x W; ``scale``, ``shift``: CH. The hints (see the
    module's docstring) skip reading ``total`` and ``pre``; not for autograd."""
    _check_shapes(rel, (out, total, part, pre), ("out", "total", "part", "pre"))
    batch, maps, channels, height, width = rel.shape
    _check_fold(scale, shift, channels)
    hw = height * width
    channels_last = _layout(rel, out)
    tensors = (rel, out, total, part, pre, scale, shift)
    result = empty(rel.shape, _result_dtype(*tensors), rel.device, channels_last)
    scale, shift = scale.contiguous(), shift.contiguous()  # the kernel reads them at ch
    block_c, block_p, warps = tile(channels, hw, channels_last, *(t.dtype for t in tensors))
    wrap_triton(_residual_split_fwd_kernel)[grid(channels, hw, batch, block_c, block_p)](
        rel, out, total, part, pre, scale, shift, result, _epsilon(e, tensors), maps, channels, hw,
        *spatial_strides(rel, 3), *spatial_strides(out, 2), *spatial_strides(total, 2), *spatial_strides(part, 2),
        *spatial_strides(pre, 2), *spatial_strides(result, 3),
        OUT_IS_RELU=bool(out_is_relu), PART_IS_FOLD=bool(part_is_fold), IS_FP64=_is_fp64(*tensors),
        CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps, maxnreg=MAX_REGISTERS,
    )
    return result


def residual_split_backward(grad_result, rel, out, total, part, pre, scale, shift, e, wrap_triton=unwrapped):
    """Gradients with respect to rel, out, total, part, pre, scale and shift (the full formula's,
    the stabiliser's sign term constant); the tensors' in the activations' layout."""
    batch, maps, channels, height, width = rel.shape
    hw = height * width
    channels_last = _layout(rel, out)
    tensors = (grad_result, rel, out, total, part, pre, scale, shift)
    # the per-element gradients: about twice the forward's live values, so half the elements per lane
    block_c, block_p, warps = tile(channels, hw, channels_last, *(t.dtype for t in tensors), live=2)
    launch = grid(channels, hw, batch, block_c, block_p)
    grad_rel = empty(rel.shape, rel.dtype, rel.device, channels_last)
    grad_out, grad_total, grad_part, grad_pre = (empty(t.shape, t.dtype, t.device, channels_last)
                                                 for t in (out, total, part, pre))
    is_fp64 = _is_fp64(*tensors)
    partial_scale = torch.empty((batch * launch[0], channels), dtype=torch.float64 if is_fp64 else torch.float32,
                                device=rel.device)
    partial_shift = torch.empty_like(partial_scale)
    wrap_triton(_residual_split_bwd_kernel)[launch](
        grad_result, rel, out, total, part, pre, scale.contiguous(), shift.contiguous(),
        grad_rel, grad_out, grad_total, grad_part, grad_pre, partial_scale, partial_shift,
        _epsilon(e, tensors), maps, channels, hw,
        *spatial_strides(grad_result, 3), *spatial_strides(rel, 3), *spatial_strides(out, 2),
        *spatial_strides(total, 2), *spatial_strides(part, 2), *spatial_strides(pre, 2),
        *spatial_strides(grad_rel, 3), *spatial_strides(grad_out, 2),
        IS_FP64=is_fp64, CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps,
        maxnreg=MAX_REGISTERS,
    )
    # Summing the per-program partials in a fixed order keeps the result bitwise reproducible.
    return (grad_rel, grad_out, grad_total, grad_part, grad_pre,
            partial_scale.sum(0).to(scale.dtype), partial_shift.sum(0).to(shift.dtype))


def residual_shortcut_add_forward(back, rel, out, total, e, out_is_relu=False, wrap_triton=unwrapped):
    """``back + rel * out / stab(total)``, a new tensor in the activations' layout. ``back`` and
    ``rel``: B x M x CH x H x W; ``out``, ``total``: B x CH x H x W. ``out_is_relu``: total is
    not read (see the module's docstring); not for autograd."""
    _check_shapes(rel, (out, total), ("out", "total"))
    if back.shape != rel.shape:
        raise ValueError(f"back must have rel's shape {tuple(rel.shape)}, got {tuple(back.shape)}")
    batch, maps, channels, height, width = rel.shape
    hw = height * width
    channels_last = _layout(rel, out)
    tensors = (back, rel, out, total)
    result = empty(rel.shape, _result_dtype(*tensors), rel.device, channels_last)
    block_c, block_p, warps = tile(channels, hw, channels_last, *(t.dtype for t in tensors))
    wrap_triton(_residual_shortcut_add_fwd_kernel)[grid(channels, hw, batch, block_c, block_p)](
        back, rel, out, total, result, _epsilon(e, tensors), maps, channels, hw,
        *spatial_strides(back, 3), *spatial_strides(rel, 3), *spatial_strides(out, 2), *spatial_strides(total, 2),
        *spatial_strides(result, 3),
        OUT_IS_RELU=bool(out_is_relu), IS_FP64=_is_fp64(*tensors), CHANNELS_LAST=channels_last,
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps, maxnreg=MAX_REGISTERS,
    )
    return result


def residual_shortcut_add_backward(grad_result, rel, out, total, e, wrap_triton=unwrapped):
    """Gradients with respect to rel, out and total, in the activations' layout (back's gradient
    is ``grad_result`` itself)."""
    batch, maps, channels, height, width = rel.shape
    hw = height * width
    channels_last = _layout(rel, out)
    tensors = (grad_result, rel, out, total)
    block_c, block_p, warps = tile(channels, hw, channels_last, *(t.dtype for t in tensors))
    grad_rel = empty(rel.shape, rel.dtype, rel.device, channels_last)
    grad_out = empty(out.shape, out.dtype, out.device, channels_last)
    grad_total = empty(total.shape, total.dtype, total.device, channels_last)
    is_fp64 = _is_fp64(*tensors)
    wrap_triton(_residual_shortcut_add_bwd_kernel)[grid(channels, hw, batch, block_c, block_p)](
        grad_result, rel, out, total, grad_rel, grad_out, grad_total,
        _epsilon(e, tensors), maps, channels, hw,
        *spatial_strides(grad_result, 3), *spatial_strides(rel, 3), *spatial_strides(out, 2),
        *spatial_strides(total, 2), *spatial_strides(grad_rel, 3), *spatial_strides(grad_out, 2),
        IS_FP64=is_fp64, CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps,
        maxnreg=MAX_REGISTERS,
    )
    return grad_rel, grad_out, grad_total
