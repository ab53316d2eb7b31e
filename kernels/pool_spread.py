"""Transition step: 2x2 average-pool spreading fused with the conv -> ReLU epsilon step.

    out[b, m, ch, y, x] = rel[b, m, ch, y // 2, x // 2] * act[b, ch, y, x] / (4 * stab(pre[b, ch, y, x]))

``rel`` is the summed quotient at the pool's output (the next block's input), ``act`` the
transition's ReLU output (the pool's input) and ``pre`` its conv output. Spreading through a
2x2/stride-2 average pool needs no convolution. Rows and columns an odd size left out of the
pool get nothing (zeros, written by the kernels: no zero-filled allocation first).

Tiles follow the activations' layout (channels or pixels on the fast axis, see ``_common``);
the outputs take that layout.
"""

import torch
import triton
import triton.language as tl

from ._common import (MAX_REGISTERS, channels_innermost, check_plane, empty, grid, scalars, spatial_strides, stabilize,
                      tile, tile_indices, to_compute, unwrapped)


@triton.jit(do_not_specialize=["MAPS"])
def _pool_spread_fwd_kernel(
    rel_ptr, act_ptr, pre_ptr, out_ptr, e_ptr,
    MAPS, CHANNELS, HW, WIDTH, POOLED_H, POOLED_W,
    rel_sb, rel_sm, rel_sch, rel_sh, rel_sw,
    act_sb, act_sch, act_sp,
    pre_sb, pre_sch, pre_sp,
    out_sb, out_sm, out_sch, out_sp,
    ACT_IS_RELU: tl.constexpr, IS_FP64: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One lane per full-resolution element. Traffic, in bytes per element per map: reads
    s_rel / 4 (the four lanes of a window share one address) + (s_act + s_pre) / M, writes s_out;
    with ``ACT_IS_RELU`` (act = relu(pre), no autograd) pre is not read. The minimum."""
    ch, p, _ = tile_indices(BLOCK_C, BLOCK_P, CHANNELS_LAST)
    b = tl.program_id(2).to(tl.int64)
    e = to_compute(tl.load(e_ptr), IS_FP64)
    mask = (ch < CHANNELS) & (p < HW)  # HW passed whole: its divisibility by 16 lets masks vectorise
    # pixel coordinates in int32 (a plane has < 2**31 pixels); offsets below are int64
    pixel = p.to(tl.int32)
    i = (pixel // WIDTH) // 2
    j = (pixel % WIDTH) // 2
    inside = mask & (i < POOLED_H) & (j < POOLED_W)
    act = to_compute(tl.load(act_ptr + b * act_sb + ch * act_sch + p * act_sp, mask=mask, other=0.0), IS_FP64)
    if ACT_IS_RELU:  # stab(pre) = act + e where act > 0; the gate is 0 where act = 0
        gate = tl.where(inside, act / (act + e) / 4.0, 0.0)
    else:
        pre = to_compute(tl.load(pre_ptr + b * pre_sb + ch * pre_sch + p * pre_sp, mask=mask, other=0.0), IS_FP64)
        gate = tl.where(inside, act / (4.0 * stabilize(pre, e)), 0.0)
    rel_ptrs = rel_ptr + b * rel_sb + ch * rel_sch + i.to(tl.int64) * rel_sh + j.to(tl.int64) * rel_sw
    out_ptrs = out_ptr + b * out_sb + ch * out_sch + p * out_sp
    for _ in range(MAPS):
        rel = to_compute(tl.load(rel_ptrs, mask=inside, other=0.0), IS_FP64)
        tl.store(out_ptrs, (rel * gate).to(out_ptr.dtype.element_ty), mask=mask)
        rel_ptrs += rel_sm
        out_ptrs += out_sm


@triton.jit(do_not_specialize=["MAPS"])
def _pool_spread_bwd_kernel(
    grad_out_ptr, rel_ptr, act_ptr, pre_ptr, grad_rel_ptr, grad_act_ptr, grad_pre_ptr, e_ptr,
    MAPS, CHANNELS, HEIGHT, WIDTH, POOLED_H, POOLED_W, WINDOWS_W, WINDOWS,
    go_sb, go_sm, go_sch, go_sh, go_sw,
    rel_sb, rel_sm, rel_sch, rel_sh, rel_sw,
    act_sb, act_sch, act_sh, act_sw,
    pre_sb, pre_sch, pre_sh, pre_sw,
    gr_sb, gr_sm, gr_sch, gr_sh, gr_sw,
    ga_sb, ga_sch, ga_sh, ga_sw,
    IS_FP64: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One lane per 2x2 window, over cdiv(H, 2) x cdiv(W, 2) windows: those past the pooled size
    hold the rows and columns the pool dropped, and write their zeros. No two lanes write one
    place. Traffic, in bytes per full-resolution element per map: reads s_grad_out + s_rel / 4 +
    (s_act + s_pre) / M, writes s_rel / 4 (grad_rel) + (s_act + s_pre) / M (grad_act, grad_pre).
    The minimum: rel read and grad_rel written once per pooled element, not once per window pixel."""
    ch, q, _ = tile_indices(BLOCK_C, BLOCK_P, CHANNELS_LAST)
    b = tl.program_id(2).to(tl.int64)
    e = to_compute(tl.load(e_ptr), IS_FP64)
    mask = (ch < CHANNELS) & (q < WINDOWS)
    window = q.to(tl.int32)
    i = (window // WINDOWS_W).to(tl.int64)
    j = (window % WINDOWS_W).to(tl.int64)
    inside = mask & (i < POOLED_H) & (j < POOLED_W)
    # the window's four pixels, in raster order
    y0, x0 = 2 * i, 2 * j
    exists0 = mask & (y0 < HEIGHT) & (x0 < WIDTH)
    exists1 = mask & (y0 < HEIGHT) & (x0 + 1 < WIDTH)
    exists2 = mask & (y0 + 1 < HEIGHT) & (x0 < WIDTH)
    exists3 = mask & (y0 + 1 < HEIGHT) & (x0 + 1 < WIDTH)
    act_base = act_ptr + b * act_sb + ch * act_sch + y0 * act_sh + x0 * act_sw
    pre_base = pre_ptr + b * pre_sb + ch * pre_sch + y0 * pre_sh + x0 * pre_sw
    act0 = to_compute(tl.load(act_base, mask=inside, other=0.0), IS_FP64)
    act1 = to_compute(tl.load(act_base + act_sw, mask=inside, other=0.0), IS_FP64)
    act2 = to_compute(tl.load(act_base + act_sh, mask=inside, other=0.0), IS_FP64)
    act3 = to_compute(tl.load(act_base + act_sh + act_sw, mask=inside, other=0.0), IS_FP64)
    # 1 / (4 stab(pre)): zero outside the pool, so every gradient there comes out zero
    inv0 = tl.where(inside, 0.25 / stabilize(to_compute(tl.load(pre_base, mask=inside, other=0.0), IS_FP64), e), 0.0)
    inv1 = tl.where(inside, 0.25 / stabilize(to_compute(tl.load(pre_base + pre_sw, mask=inside, other=0.0),
                                                        IS_FP64), e), 0.0)
    inv2 = tl.where(inside, 0.25 / stabilize(to_compute(tl.load(pre_base + pre_sh, mask=inside, other=0.0),
                                                        IS_FP64), e), 0.0)
    inv3 = tl.where(inside, 0.25 / stabilize(to_compute(tl.load(pre_base + pre_sh + pre_sw, mask=inside,
                                                                other=0.0), IS_FP64), e), 0.0)
    q0 = tl.zeros(act0.shape, dtype=act0.dtype)
    q1 = tl.zeros(act0.shape, dtype=act0.dtype)
    q2 = tl.zeros(act0.shape, dtype=act0.dtype)
    q3 = tl.zeros(act0.shape, dtype=act0.dtype)
    go_ptrs = grad_out_ptr + b * go_sb + ch * go_sch + y0 * go_sh + x0 * go_sw
    rel_ptrs = rel_ptr + b * rel_sb + ch * rel_sch + i * rel_sh + j * rel_sw
    gr_ptrs = grad_rel_ptr + b * gr_sb + ch * gr_sch + i * gr_sh + j * gr_sw
    for _ in range(MAPS):
        rel = to_compute(tl.load(rel_ptrs, mask=inside, other=0.0), IS_FP64)
        go0 = to_compute(tl.load(go_ptrs, mask=inside, other=0.0), IS_FP64)
        go1 = to_compute(tl.load(go_ptrs + go_sw, mask=inside, other=0.0), IS_FP64)
        go2 = to_compute(tl.load(go_ptrs + go_sh, mask=inside, other=0.0), IS_FP64)
        go3 = to_compute(tl.load(go_ptrs + go_sh + go_sw, mask=inside, other=0.0), IS_FP64)
        grad_rel = go0 * act0 * inv0 + go1 * act1 * inv1 + go2 * act2 * inv2 + go3 * act3 * inv3
        tl.store(gr_ptrs, grad_rel.to(grad_rel_ptr.dtype.element_ty), mask=inside)
        q0 += go0 * rel
        q1 += go1 * rel
        q2 += go2 * rel
        q3 += go3 * rel
        go_ptrs += go_sm
        rel_ptrs += rel_sm
        gr_ptrs += gr_sm
    # d out / d act = rel inv; d out / d pre = -rel act inv / stab(pre) = -4 rel act inv^2
    ga_base = b * ga_sb + ch * ga_sch + y0 * ga_sh + x0 * ga_sw
    ty = grad_act_ptr.dtype.element_ty
    tl.store(grad_act_ptr + ga_base, (q0 * inv0).to(ty), mask=exists0)
    tl.store(grad_act_ptr + ga_base + ga_sw, (q1 * inv1).to(ty), mask=exists1)
    tl.store(grad_act_ptr + ga_base + ga_sh, (q2 * inv2).to(ty), mask=exists2)
    tl.store(grad_act_ptr + ga_base + ga_sh + ga_sw, (q3 * inv3).to(ty), mask=exists3)
    tl.store(grad_pre_ptr + ga_base, (-4.0 * q0 * act0 * inv0 * inv0).to(ty), mask=exists0)
    tl.store(grad_pre_ptr + ga_base + ga_sw, (-4.0 * q1 * act1 * inv1 * inv1).to(ty), mask=exists1)
    tl.store(grad_pre_ptr + ga_base + ga_sh, (-4.0 * q2 * act2 * inv2 * inv2).to(ty), mask=exists2)
    tl.store(grad_pre_ptr + ga_base + ga_sh + ga_sw, (-4.0 * q3 * act3 * inv3 * inv3).to(ty), mask=exists3)


def _strides(t):
    return [t.stride(d) for d in range(t.dim())]


def _layout(rel, act):
    if act.shape[1] > 1 and act.shape[-2] * act.shape[-1] > 1:
        return channels_innermost(act, 1)
    return channels_innermost(rel, 2)


def pool_spread_forward(rel, act, pre, e, act_is_relu=False, wrap_triton=unwrapped):
    """``rel``: B x M x CH x h x w; ``act``, ``pre``: B x CH x H x W with H >= 2h, W >= 2w
    (flattenable H, W). ``act_is_relu``: act is relu(pre), which is then not read (not for
    autograd)."""
    batch, maps, channels, pooled_h, pooled_w = rel.shape
    height, width = act.shape[-2:]
    check_plane(height, width)
    channels_last = _layout(rel, act)
    out = empty((batch, maps, channels, height, width), rel.dtype, rel.device, channels_last)
    block_c, block_p, warps = tile(channels, height * width, channels_last, rel.dtype, act.dtype)
    wrap_triton(_pool_spread_fwd_kernel)[grid(channels, height * width, batch, block_c, block_p)](
        rel, act, pre, out, scalars([e], rel), maps, channels, height * width, width, pooled_h, pooled_w,
        *_strides(rel), *spatial_strides(act, 2), *spatial_strides(pre, 2), *spatial_strides(out, 3),
        ACT_IS_RELU=bool(act_is_relu), IS_FP64=rel.dtype == torch.float64, CHANNELS_LAST=channels_last,
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps, maxnreg=MAX_REGISTERS,
    )
    return out


def pool_spread_backward(grad_out, rel, act, pre, e, wrap_triton=unwrapped):
    batch, maps, channels, pooled_h, pooled_w = rel.shape
    height, width = act.shape[-2:]
    check_plane(height, width)
    channels_last = _layout(rel, act)
    grad_rel = empty((batch, maps, channels, pooled_h, pooled_w), rel.dtype, rel.device, channels_last)
    grad_act = empty((batch, channels, height, width), act.dtype, act.device, channels_last)
    grad_pre = empty((batch, channels, height, width), pre.dtype, pre.device, channels_last)
    windows_h, windows_w = triton.cdiv(height, 2), triton.cdiv(width, 2)
    # twelve values live per window (four gates, denominators and sums): half the windows per lane
    block_c, block_p, warps = tile(channels, windows_h * windows_w, channels_last, rel.dtype, act.dtype, live=2)
    wrap_triton(_pool_spread_bwd_kernel)[grid(channels, windows_h * windows_w, batch, block_c, block_p)](
        grad_out, rel, act, pre, grad_rel, grad_act, grad_pre, scalars([e], rel),
        maps, channels, height, width, pooled_h, pooled_w, windows_w, windows_h * windows_w,
        *_strides(grad_out), *_strides(rel), *_strides(act), *_strides(pre), *_strides(grad_rel), *_strides(grad_act),
        IS_FP64=rel.dtype == torch.float64, CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_P=block_p,
        num_warps=warps, maxnreg=MAX_REGISTERS,
    )
    return grad_rel, grad_act, grad_pre
