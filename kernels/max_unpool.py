"""Stem step: max-pool un-pooling with the original's overwrite rule, fused with the
conv -> BatchNorm -> ReLU epsilon step (its stabilised denominator given as ``z``).

    out[b, m, ch, p] = rel[b, m, ch, winner(p)] * act[b, ch, p] / stab(z[b, ch, p])   (0 without a winner)

winner(p) is the last pooled position, in raster order, whose window chose input pixel p:
what the original's ``max_unpool2d`` leaves on the CPU, where later writes overwrite earlier
ones. Each lane gathers over the few windows that contain its pixel, so there are no atomics
and no races, and every run gives the same bits on any device. The backward gives each pooled
position the gradient at the pixel it chose, overwritten or not, as the original's autograd
does; one kernel computes it with the activations' gradients, each pooled position written by
the lane of the pixel it chose (exactly one lane).

Tiles follow the activations' layout (``_common``); the outputs take that layout. Square
windows, dilation 1.
"""

import torch
import triton
import triton.language as tl

from ._common import (MAX_REGISTERS, channels_innermost, check_plane, empty, grid, scalars, spatial_strides, stabilize,
                      tile, tile_indices, to_compute, unwrapped)


@triton.jit
def _windows(index_ptr, b, ch, p, mask, WIDTH, POOLED_H, POOLED_W, idx_sb, idx_sch, idx_sh, idx_sw,
             KERNEL: tl.constexpr, STRIDE: tl.constexpr, PADDING: tl.constexpr, CANDIDATES: tl.constexpr):
    """The pooled windows holding pixel p that chose it: the last one in raster order (its row
    and column, (0, 0) if none), whether there is one, and a bit per candidate window (bit
    di * CANDIDATES + dj for the window at (first_row + di, first_col + dj)) with the first
    candidate's row and column. Each candidate's index is read once."""
    pixel = p.to(tl.int32)
    y = pixel // WIDTH
    x = pixel % WIDTH
    # windows i cover rows i * STRIDE - PADDING .. + KERNEL - 1: those holding y run from
    # ceil((y + PADDING - KERNEL + 1) / STRIDE) to (y + PADDING) // STRIDE, at most CANDIDATES
    first_i = (y + PADDING) // STRIDE - (CANDIDATES - 1)
    first_j = (x + PADDING) // STRIDE - (CANDIDATES - 1)
    low_i = (tl.maximum(y + (PADDING - KERNEL + 1), 0) + (STRIDE - 1)) // STRIDE
    low_j = (tl.maximum(x + (PADDING - KERNEL + 1), 0) + (STRIDE - 1)) // STRIDE
    winner_i = tl.zeros(pixel.shape, dtype=tl.int32)
    winner_j = tl.zeros(pixel.shape, dtype=tl.int32)
    chosen_by = tl.zeros(pixel.shape, dtype=tl.int32)
    row_ptrs = index_ptr + b * idx_sb + ch * idx_sch + first_i.to(tl.int64) * idx_sh + first_j.to(tl.int64) * idx_sw
    for di in tl.static_range(CANDIDATES):
        i = first_i + di
        ptrs = row_ptrs
        for dj in tl.static_range(CANDIDATES):
            j = first_j + dj
            covers = mask & (i >= low_i) & (i < POOLED_H) & (j >= low_j) & (j < POOLED_W)
            chose = covers & (tl.load(ptrs, mask=covers, other=-1) == p)
            winner_i = tl.where(chose, i, winner_i)
            winner_j = tl.where(chose, j, winner_j)
            chosen_by = chosen_by | tl.where(chose, 1 << (di * CANDIDATES + dj), 0)
            ptrs += idx_sw
        row_ptrs += idx_sh
    return winner_i, winner_j, chosen_by != 0, chosen_by, first_i, first_j


@triton.jit
def _act_and_denominator(act_ptr, z_ptr, e_ptr, b, ch, p, mask, act_sb, act_sch, act_sp, z_sb, z_sch, z_sp,
                         IS_FP64: tl.constexpr):
    """The activation at each lane's input element and its stabilised denominator stab(z)."""
    e = to_compute(tl.load(e_ptr), IS_FP64)
    act = to_compute(tl.load(act_ptr + b * act_sb + ch * act_sch + p * act_sp, mask=mask, other=0.0), IS_FP64)
    z = to_compute(tl.load(z_ptr + b * z_sb + ch * z_sch + p * z_sp, mask=mask, other=0.0), IS_FP64)
    return act, stabilize(z, e)


@triton.jit(do_not_specialize=["MAPS"])
def _max_unpool_fwd_kernel(
    rel_ptr, index_ptr, act_ptr, z_ptr, out_ptr, e_ptr,
    MAPS, CHANNELS, HW, WIDTH, POOLED_H, POOLED_W,
    rel_sb, rel_sm, rel_sch, rel_sh, rel_sw,
    idx_sb, idx_sch, idx_sh, idx_sw,
    act_sb, act_sch, act_sp,
    z_sb, z_sch, z_sp,
    out_sb, out_sm, out_sch, out_sp,
    KERNEL: tl.constexpr, STRIDE: tl.constexpr, PADDING: tl.constexpr, CANDIDATES: tl.constexpr,
    IS_FP64: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One lane per input element (b, ch, p). Traffic, in bytes per element per map: reads
    s_rel / 4 (each pooled value by the pixel it won; stride 2) + (s_act + s_z + 8 / 4) / M
    (the int64 index of each window once from memory: a lane reads those of the windows holding
    its pixel, 2.25 on average for 3x3/2, from cache), writes s_out. The minimum."""
    ch, p, _ = tile_indices(BLOCK_C, BLOCK_P, CHANNELS_LAST)
    b = tl.program_id(2).to(tl.int64)
    mask = (ch < CHANNELS) & (p < HW)
    winner_i, winner_j, found, _, _, _ = _windows(
        index_ptr, b, ch, p, mask, WIDTH, POOLED_H, POOLED_W, idx_sb, idx_sch, idx_sh, idx_sw,
        KERNEL, STRIDE, PADDING, CANDIDATES)
    act, denominator = _act_and_denominator(act_ptr, z_ptr, e_ptr, b, ch, p, mask, act_sb, act_sch, act_sp,
                                            z_sb, z_sch, z_sp, IS_FP64)
    gate = act / denominator
    rel_ptrs = (rel_ptr + b * rel_sb + ch * rel_sch + winner_i.to(tl.int64) * rel_sh
                + winner_j.to(tl.int64) * rel_sw)
    out_ptrs = out_ptr + b * out_sb + ch * out_sch + p * out_sp
    found = mask & found
    for _ in range(MAPS):
        rel = to_compute(tl.load(rel_ptrs, mask=found, other=0.0), IS_FP64)
        tl.store(out_ptrs, (rel * gate).to(out_ptr.dtype.element_ty), mask=mask)
        rel_ptrs += rel_sm
        out_ptrs += out_sm


@triton.jit(do_not_specialize=["MAPS"])
def _max_unpool_bwd_kernel(
    grad_out_ptr, rel_ptr, index_ptr, act_ptr, z_ptr, grad_rel_ptr, grad_act_ptr, grad_z_ptr, e_ptr,
    MAPS, CHANNELS, HW, WIDTH, POOLED_H, POOLED_W,
    go_sb, go_sm, go_sch, go_sp,
    rel_sb, rel_sm, rel_sch, rel_sh, rel_sw,
    idx_sb, idx_sch, idx_sh, idx_sw,
    act_sb, act_sch, act_sp,
    z_sb, z_sch, z_sp,
    gr_sb, gr_sm, gr_sch, gr_sh, gr_sw,
    ga_sb, ga_sch, ga_sp,
    KERNEL: tl.constexpr, STRIDE: tl.constexpr, PADDING: tl.constexpr, CANDIDATES: tl.constexpr,
    IS_FP64: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One lane per input element: grad_act and grad_z at its pixel, and grad_rel at every
    window that chose its pixel (each pooled position chose one pixel: written once, by one lane).
    Traffic, in bytes per element per map: reads s_grad_out + s_rel / 4 + (s_act + s_z + 8 / 4) / M
    (indices as the forward), writes s_rel / 4 (grad_rel) + (s_act + s_z) / M (grad_act, grad_z,
    same strides). The minimum: grad_out, act and z are read once, by one kernel."""
    ch, p, _ = tile_indices(BLOCK_C, BLOCK_P, CHANNELS_LAST)
    b = tl.program_id(2).to(tl.int64)
    mask = (ch < CHANNELS) & (p < HW)
    winner_i, winner_j, found, chosen_by, first_i, first_j = _windows(
        index_ptr, b, ch, p, mask, WIDTH, POOLED_H, POOLED_W, idx_sb, idx_sch, idx_sh, idx_sw,
        KERNEL, STRIDE, PADDING, CANDIDATES)
    act, denominator = _act_and_denominator(act_ptr, z_ptr, e_ptr, b, ch, p, mask, act_sb, act_sch, act_sp,
                                            z_sb, z_sch, z_sp, IS_FP64)
    gate = act / denominator
    found = mask & found
    rel_ptrs = (rel_ptr + b * rel_sb + ch * rel_sch + winner_i.to(tl.int64) * rel_sh
                + winner_j.to(tl.int64) * rel_sw)
    go_ptrs = grad_out_ptr + b * go_sb + ch * go_sch + p * go_sp
    gr_ptrs = (grad_rel_ptr + b * gr_sb + ch * gr_sch + first_i.to(tl.int64) * gr_sh
               + first_j.to(tl.int64) * gr_sw)
    q = tl.zeros(act.shape, dtype=act.dtype)
    for _ in range(MAPS):
        grad_out = to_compute(tl.load(go_ptrs, mask=mask, other=0.0), IS_FP64)
        q += grad_out * to_compute(tl.load(rel_ptrs, mask=found, other=0.0), IS_FP64)
        value = (grad_out * gate).to(grad_rel_ptr.dtype.element_ty)
        row_ptrs = gr_ptrs
        for di in tl.static_range(CANDIDATES):
            ptrs = row_ptrs
            for dj in tl.static_range(CANDIDATES):
                tl.store(ptrs, value, mask=mask & (((chosen_by >> (di * CANDIDATES + dj)) & 1) != 0))
                ptrs += gr_sw
            row_ptrs += gr_sh
        go_ptrs += go_sm
        rel_ptrs += rel_sm
        gr_ptrs += gr_sm
    offset = b * ga_sb + ch * ga_sch + p * ga_sp
    tl.store(grad_act_ptr + offset, (q / denominator).to(grad_act_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_z_ptr + offset, (-q * act / (denominator * denominator)).to(grad_z_ptr.dtype.element_ty), mask=mask)


def _geometry(kernel_size, stride, padding):
    return dict(KERNEL=kernel_size, STRIDE=stride, PADDING=padding, CANDIDATES=triton.cdiv(kernel_size, stride))


def _strides(t):
    return [t.stride(d) for d in range(t.dim())]


def _layout(rel, act):
    if act.shape[1] > 1 and act.shape[-2] * act.shape[-1] > 1:
        return channels_innermost(act, 1)
    return channels_innermost(rel, 2)


def launch_unpool_forward(kernel, rel, indices, act, z, e, kernel_size, stride, padding, wrap_triton):
    """Runs an un-pooling forward kernel (this module's overwriting one, or the summing one of
    ``max_unpool_sum``: the same arguments) into a new tensor."""
    batch, maps, channels, pooled_h, pooled_w = rel.shape
    height, width = act.shape[-2:]
    check_plane(height, width)
    channels_last = _layout(rel, act)
    out = empty((batch, maps, channels, height, width), rel.dtype, rel.device, channels_last)
    block_c, block_p, warps = tile(channels, height * width, channels_last, rel.dtype, act.dtype)
    wrap_triton(kernel)[grid(channels, height * width, batch, block_c, block_p)](
        rel, indices, act, z, out, scalars([e], rel), maps, channels, height * width, width, pooled_h, pooled_w,
        *_strides(rel), *_strides(indices), *spatial_strides(act, 2), *spatial_strides(z, 2),
        *spatial_strides(out, 3), **_geometry(kernel_size, stride, padding),
        IS_FP64=rel.dtype == torch.float64, CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_P=block_p,
        num_warps=warps, maxnreg=MAX_REGISTERS,
    )
    return out


def launch_unpool_backward(kernel, grad_out, rel, indices, act, z, e, kernel_size, stride, padding, wrap_triton):
    """Runs an un-pooling backward kernel (see ``launch_unpool_forward``); (grad_rel, grad_act, grad_z).
    Every pooled position chose one pixel, so every element of grad_rel is written."""
    batch, maps, channels, pooled_h, pooled_w = rel.shape
    height, width = act.shape[-2:]
    check_plane(height, width)
    channels_last = _layout(rel, act)
    grad_rel = empty((batch, maps, channels, pooled_h, pooled_w), rel.dtype, rel.device, channels_last)
    grad_act = empty((batch, channels, height, width), act.dtype, act.device, channels_last)
    grad_z = empty((batch, channels, height, width), z.dtype, z.device, channels_last)
    block_c, block_p, warps = tile(channels, height * width, channels_last, rel.dtype, act.dtype)
    wrap_triton(kernel)[grid(channels, height * width, batch, block_c, block_p)](
        grad_out, rel, indices, act, z, grad_rel, grad_act, grad_z, scalars([e], rel),
        maps, channels, height * width, width, pooled_h, pooled_w,
        *spatial_strides(grad_out, 3), *_strides(rel), *_strides(indices), *spatial_strides(act, 2),
        *spatial_strides(z, 2), *_strides(grad_rel), *spatial_strides(grad_act, 2),
        **_geometry(kernel_size, stride, padding),
        IS_FP64=rel.dtype == torch.float64, CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_P=block_p,
        num_warps=warps, maxnreg=MAX_REGISTERS,
    )
    return grad_rel, grad_act, grad_z


def max_unpool_forward(rel, indices, act, z, e, kernel_size, stride, padding, wrap_triton=unwrapped):
    """``rel``: B x M x CH x h x w; ``indices``: B x CH x h x w (max_pool2d's); ``act``, ``z``:
    B x CH x H x W (flattenable H, W). Any strides."""
    return launch_unpool_forward(_max_unpool_fwd_kernel, rel, indices, act, z, e, kernel_size, stride, padding,
                                 wrap_triton)


def max_unpool_backward(grad_out, rel, indices, act, z, e, kernel_size, stride, padding, wrap_triton=unwrapped):
    return launch_unpool_backward(_max_unpool_bwd_kernel, grad_out, rel, indices, act, z, e, kernel_size, stride,
                                  padding, wrap_triton)
