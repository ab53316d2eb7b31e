"""Epsilon-rule step as a map-broadcast product, optionally accumulated in place.

    out[b, m, ch, p] (+)= rel[b, m, ch, p] * act[b, ch, p] * scale[ch] / stab(pre[b, ch, p] * scale[ch] + shift[ch])

``rel`` is the relevance coming back through a transposed convolution (one per map), ``act``
the activation at that convolution's input, ``pre`` the pre-activation the stabilised
denominator is built from, and (scale, shift) a BatchNorm folded into it (absent: 1 and 0).
It serves every conv -> BatchNorm -> ReLU and conv -> ReLU step, and the dense concatenation
split: with ``accumulate`` each consumer's quotient is added into the block-wide tensor that
the producers' transposed convolutions read, without a per-consumer temporary. The gate
(everything but ``rel``) is computed once per tile and reused for every map.

Both layouts run coalesced: the tile's fast axis is the channels for channels_last tensors and
the pixels for NCHW ones (``_common.tile_indices``); the outputs take the activations' layout.
"""

import torch
import triton
import triton.language as tl

from ._common import (MAX_REGISTERS, channels_innermost, compute_dtype, empty, grid, scalars, spatial_strides,
                      stabilize, sum_over_pixels, tile, tile_indices, to_compute, unwrapped)


@triton.jit
def _per_channel(ptr, ch, p, mask, channels, IS_FP64: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """A fold's per-channel values, broadcast over the tile in the tile's own layout, so that no
    layout conversion through shared memory follows: with the channels on the fast axis a load
    at the tile's shape (the repeats hit L1), else a load of the tile's column of channels."""
    if CHANNELS_LAST:
        return to_compute(tl.load(ptr + (ch + 0 * p), mask=mask, other=0.0), IS_FP64)
    else:
        return to_compute(tl.load(ptr + ch, mask=ch < channels, other=0.0), IS_FP64)


@triton.jit
def _gate(act_ptr, pre_ptr, scale_ptr, shift_ptr, e_ptr, b, ch, p, mask, channels,
          act_sb, act_sch, act_sp, pre_sb, pre_sch, pre_sp, HAS_FOLD: tl.constexpr, IS_FP64: tl.constexpr,
          CHANNELS_LAST: tl.constexpr):
    """Loads a tile's activations; returns act, pre, scale, 1 / the stabilised denominator and the
    gate act * scale / stab(pre * scale + shift) (scale 1 and shift 0 without a fold). One
    division per element: each IEEE division may call ptxas' slow-path subroutine, whose saved
    registers showed up as spills."""
    e = to_compute(tl.load(e_ptr), IS_FP64)
    act = to_compute(tl.load(act_ptr + b * act_sb + ch * act_sch + p * act_sp, mask=mask, other=0.0), IS_FP64)
    pre = to_compute(tl.load(pre_ptr + b * pre_sb + ch * pre_sch + p * pre_sp, mask=mask, other=0.0), IS_FP64)
    if HAS_FOLD:
        scale = _per_channel(scale_ptr, ch, p, mask, channels, IS_FP64, CHANNELS_LAST)
        shift = _per_channel(shift_ptr, ch, p, mask, channels, IS_FP64, CHANNELS_LAST)
        denominator = stabilize(pre * scale + shift, e)
    else:
        scale = to_compute(tl.full([], 1.0, tl.float32), IS_FP64)
        denominator = stabilize(pre, e)
    inverse = 1.0 / denominator
    return act, pre, scale, inverse, act * scale * inverse


@triton.jit
def _relu_gate(act_ptr, scale_ptr, e_ptr, b, ch, p, mask, channels, act_sb, act_sch, act_sp,
               HAS_FOLD: tl.constexpr, IS_FP64: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """The gate where act is the ReLU of the stabilised pre-activation itself (an eval-mode
    BatchNorm's fold): act * scale / (act + e), as ``torch_ops``'s hint computes it. Where act > 0
    it is z (stab(z) = act + e); where act = 0 the gate is 0 whatever z is. Reads neither pre nor
    the shift."""
    e = to_compute(tl.load(e_ptr), IS_FP64)
    act = to_compute(tl.load(act_ptr + b * act_sb + ch * act_sch + p * act_sp, mask=mask, other=0.0), IS_FP64)
    gate = act / (act + e)
    if HAS_FOLD:
        gate = gate * _per_channel(scale_ptr, ch, p, mask, channels, IS_FP64, CHANNELS_LAST)
    return gate


@triton.jit(do_not_specialize=["MAPS"])
def _gated_product_fwd_kernel(
    rel_ptr, act_ptr, pre_ptr, scale_ptr, shift_ptr, out_ptr, e_ptr,
    MAPS, CHANNELS, HW,
    rel_sb, rel_sm, rel_sch, rel_sp,
    act_sb, act_sch, act_sp,
    pre_sb, pre_sch, pre_sp,
    out_sb, out_sm, out_sch, out_sp,
    HAS_FOLD: tl.constexpr, ACCUMULATE: tl.constexpr, ACT_IS_RELU: tl.constexpr, IS_FP64: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Traffic, in bytes per element (b, ch, p) per map, with M maps and s_x the element size of x:
    reads s_rel (+ s_out when accumulating) + (s_act + s_pre) / M, writes s_out; with
    ``ACT_IS_RELU`` (act = relu(pre * scale + shift), no autograd) pre is not read: s_act / M.
    The minimum: every input the math needs read once, every output written once (the folds, CH
    values, aside)."""
    ch, p, _ = tile_indices(BLOCK_C, BLOCK_P, CHANNELS_LAST)
    b = tl.program_id(2).to(tl.int64)
    mask = (ch < CHANNELS) & (p < HW)
    if ACT_IS_RELU:
        gate = _relu_gate(act_ptr, scale_ptr, e_ptr, b, ch, p, mask, CHANNELS, act_sb, act_sch, act_sp, HAS_FOLD,
                          IS_FP64, CHANNELS_LAST)
    else:
        _, _, _, _, gate = _gate(
            act_ptr, pre_ptr, scale_ptr, shift_ptr, e_ptr, b, ch, p, mask, CHANNELS,
            act_sb, act_sch, act_sp, pre_sb, pre_sch, pre_sp, HAS_FOLD, IS_FP64, CHANNELS_LAST)
    rel_ptrs = rel_ptr + b * rel_sb + ch * rel_sch + p * rel_sp
    out_ptrs = out_ptr + b * out_sb + ch * out_sch + p * out_sp
    for _ in range(MAPS):
        value = to_compute(tl.load(rel_ptrs, mask=mask, other=0.0), IS_FP64) * gate
        if ACCUMULATE:
            value += to_compute(tl.load(out_ptrs, mask=mask, other=0.0), IS_FP64)
        tl.store(out_ptrs, value.to(out_ptr.dtype.element_ty), mask=mask)
        rel_ptrs += rel_sm
        out_ptrs += out_sm


@triton.jit(do_not_specialize=["MAPS"])
def _gated_product_bwd_kernel(
    grad_out_ptr, rel_ptr, act_ptr, pre_ptr, scale_ptr, shift_ptr,
    grad_rel_ptr, grad_act_ptr, grad_pre_ptr, partial_scale_ptr, partial_shift_ptr, e_ptr,
    MAPS, CHANNELS, HW,
    go_sb, go_sm, go_sch, go_sp,
    rel_sb, rel_sm, rel_sch, rel_sp,
    act_sb, act_sch, act_sp,
    pre_sb, pre_sch, pre_sp,
    gr_sb, gr_sm, gr_sch, gr_sp,
    ga_sb, ga_sch, ga_sp,
    HAS_FOLD: tl.constexpr, IS_FP64: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Traffic, in bytes per element per map: reads s_grad_out + s_rel + (s_act + s_pre) / M,
    writes s_grad_rel + (s_act + s_pre) / M (grad_act, grad_pre; grad_pre shares grad_act's
    strides). The minimum. The fold's gradients are per-tile partial sums (B x pixel blocks x CH
    in the compute dtype, a BLOCK_P-th of an element each), which the launcher sums in a fixed
    order."""
    ch, p, ch_vector = tile_indices(BLOCK_C, BLOCK_P, CHANNELS_LAST)
    b = tl.program_id(2).to(tl.int64)
    mask = (ch < CHANNELS) & (p < HW)
    act, pre, scale, inverse, gate = _gate(
        act_ptr, pre_ptr, scale_ptr, shift_ptr, e_ptr, b, ch, p, mask, CHANNELS,
        act_sb, act_sch, act_sp, pre_sb, pre_sch, pre_sp, HAS_FOLD, IS_FP64, CHANNELS_LAST)
    # q = sum over maps of grad_out * rel: all the map-independent gradients need.
    q = tl.zeros(gate.shape, dtype=gate.dtype)
    go_ptrs = grad_out_ptr + b * go_sb + ch * go_sch + p * go_sp
    rel_ptrs = rel_ptr + b * rel_sb + ch * rel_sch + p * rel_sp
    gr_ptrs = grad_rel_ptr + b * gr_sb + ch * gr_sch + p * gr_sp
    for _ in range(MAPS):
        grad_out = to_compute(tl.load(go_ptrs, mask=mask, other=0.0), IS_FP64)
        rel = to_compute(tl.load(rel_ptrs, mask=mask, other=0.0), IS_FP64)
        tl.store(gr_ptrs, (grad_out * gate).to(grad_rel_ptr.dtype.element_ty), mask=mask)
        q += grad_out * rel
        go_ptrs += go_sm
        rel_ptrs += rel_sm
        gr_ptrs += gr_sm
    # out = rel * act * scale / D(z), z = pre * scale + shift, dD/dz = 1
    grad_z = tl.where(mask, -q * gate * inverse, 0.0)
    offset = b * ga_sb + ch * ga_sch + p * ga_sp
    tl.store(grad_act_ptr + offset, (q * scale * inverse).to(grad_act_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_pre_ptr + offset, (grad_z * scale).to(grad_pre_ptr.dtype.element_ty), mask=mask)
    if HAS_FOLD:
        grad_scale = tl.where(mask, q * act * inverse + grad_z * pre, 0.0)
        row = b * tl.num_programs(0) + tl.program_id(0)
        in_range = ch_vector < CHANNELS
        tl.store(partial_scale_ptr + row * CHANNELS + ch_vector, sum_over_pixels(grad_scale, CHANNELS_LAST),
                 mask=in_range)
        tl.store(partial_shift_ptr + row * CHANNELS + ch_vector, sum_over_pixels(grad_z, CHANNELS_LAST),
                 mask=in_range)


def _layout(rel, act):
    """Channels innermost when the activations (or, with one channel or pixel, rel) are so."""
    if act.shape[1] > 1 and act.shape[-2] * act.shape[-1] > 1:
        return channels_innermost(act, 1)
    return channels_innermost(rel, 2)


def _fold(scale, shift, like):
    if scale is None:
        return like, like, False  # unused pointers
    return scale.contiguous(), shift.contiguous(), True  # the kernel reads them at ch


def gated_product_forward(rel, act, pre, scale, shift, e, out=None, act_is_relu=False, wrap_triton=unwrapped):
    """Launches the forward. ``rel``: B x M x CH x H x W (any strides with flattenable H, W);
    ``act``, ``pre``: B x CH x H x W; ``scale``, ``shift``: CH or None. With ``out`` given the
    result is added into it in place, else a new tensor, in the activations' layout, is returned.
    ``act_is_relu``: act is relu(pre * scale + shift) (see ``_relu_gate``); pre is not read. Not
    for autograd: the backward takes the full formula's gate."""
    batch, maps, channels, height, width = rel.shape
    hw = height * width
    channels_last = _layout(rel, act)
    accumulate = out is not None
    if out is None:
        out = empty((batch, maps, channels, height, width), rel.dtype, rel.device, channels_last)
    scale, shift, has_fold = _fold(scale, shift, act)
    block_c, block_p, warps = tile(channels, hw, channels_last, rel.dtype, act.dtype)
    wrap_triton(_gated_product_fwd_kernel)[grid(channels, hw, batch, block_c, block_p)](
        rel, act, pre, scale, shift, out, scalars([e], rel), maps, channels, hw,
        *spatial_strides(rel, 3), *spatial_strides(act, 2), *spatial_strides(pre, 2), *spatial_strides(out, 3),
        HAS_FOLD=has_fold, ACCUMULATE=accumulate, ACT_IS_RELU=bool(act_is_relu), IS_FP64=rel.dtype == torch.float64,
        CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps, maxnreg=MAX_REGISTERS,
    )
    return out


def gated_product_backward(grad_out, rel, act, pre, scale, shift, e, wrap_triton=unwrapped):
    """Gradients with respect to rel, act, pre, and (when folded) scale and shift; in the
    activations' layout."""
    batch, maps, channels, height, width = rel.shape
    hw = height * width
    channels_last = _layout(rel, act)
    block_c, block_p, warps = tile(channels, hw, channels_last, rel.dtype, act.dtype)
    launch = grid(channels, hw, batch, block_c, block_p)
    grad_rel = empty((batch, maps, channels, height, width), rel.dtype, rel.device, channels_last)
    grad_act = empty((batch, channels, height, width), act.dtype, act.device, channels_last)
    grad_pre = empty((batch, channels, height, width), pre.dtype, pre.device, channels_last)
    scale, shift, has_fold = _fold(scale, shift, act)
    partial_scale = torch.empty((batch * launch[0], channels), dtype=compute_dtype(rel.dtype), device=rel.device)
    partial_shift = torch.empty_like(partial_scale)
    wrap_triton(_gated_product_bwd_kernel)[launch](
        grad_out, rel, act, pre, scale, shift, grad_rel, grad_act, grad_pre, partial_scale, partial_shift,
        scalars([e], rel), maps, channels, hw,
        *spatial_strides(grad_out, 3), *spatial_strides(rel, 3), *spatial_strides(act, 2), *spatial_strides(pre, 2),
        *spatial_strides(grad_rel, 3), *spatial_strides(grad_act, 2),
        HAS_FOLD=has_fold, IS_FP64=rel.dtype == torch.float64, CHANNELS_LAST=channels_last,
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps, maxnreg=MAX_REGISTERS,
    )
    if not has_fold:
        return grad_rel, grad_act, grad_pre, None, None
    # Summing the per-program partials in a fixed order keeps the result bitwise reproducible.
    return (grad_rel, grad_act, grad_pre,
            partial_scale.sum(0).to(scale.dtype), partial_shift.sum(0).to(shift.dtype))
