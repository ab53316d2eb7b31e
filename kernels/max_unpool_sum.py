"""Stem step: max-pool un-pooling as the LRP rules read, fused with the conv -> BatchNorm -> ReLU
epsilon step (its stabilised denominator given as ``z``): every pooled position's relevance is
added into the input pixel it chose, the adjoint of max-pool's gather.

    out[b, m, ch, p] = sum over windows w that chose p of rel[b, m, ch, w]  *  act[b, ch, p] / stab(z[b, ch, p])

(0 where no window chose p). Each lane gathers over the few windows that contain its pixel
(at most ceil(k / s)^2) and adds those that chose it in raster order: no atomics, no races,
the same bits on every run and device. The backward gives each pooled position the gradient
at the pixel it chose (the gather that is the scatter-add's adjoint) and, in the same kernel,
the activations' gradients; each pooled position is written by the lane of its pixel (exactly one).

The search over the windows is ``max_unpool``'s (the overwrite rule's kernels), shared.
Tiles follow the activations' layout (``_common``); the outputs take that layout. Square
windows, dilation 1.
"""

import triton
import triton.language as tl

from ._common import tile_indices, to_compute, unwrapped
from .max_unpool import _act_and_denominator, _windows, launch_unpool_backward, launch_unpool_forward


@triton.jit
def _chose(chosen_by, mask, di, dj, CANDIDATES: tl.constexpr):
    """Whether the candidate window (first_row + di, first_col + dj) chose the lane's pixel."""
    return mask & (((chosen_by >> (di * CANDIDATES + dj)) & 1) != 0)


@triton.jit(do_not_specialize=["MAPS"])
def _max_unpool_sum_fwd_kernel(
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
    """One lane per input element (b, ch, p). Traffic as the overwrite rule's forward: each
    pooled value is read once, by the lane of the pixel it chose; act, z and the indices once."""
    ch, p, _ = tile_indices(BLOCK_C, BLOCK_P, CHANNELS_LAST)
    b = tl.program_id(2).to(tl.int64)
    mask = (ch < CHANNELS) & (p < HW)
    _, _, _, chosen_by, first_i, first_j = _windows(
        index_ptr, b, ch, p, mask, WIDTH, POOLED_H, POOLED_W, idx_sb, idx_sch, idx_sh, idx_sw,
        KERNEL, STRIDE, PADDING, CANDIDATES)
    act, denominator = _act_and_denominator(act_ptr, z_ptr, e_ptr, b, ch, p, mask, act_sb, act_sch, act_sp,
                                            z_sb, z_sch, z_sp, IS_FP64)
    gate = act / denominator
    # the first candidate window's address; candidates outside the pooled plane are never chosen (masked)
    rel_ptrs = (rel_ptr + b * rel_sb + ch * rel_sch + first_i.to(tl.int64) * rel_sh
                + first_j.to(tl.int64) * rel_sw)
    out_ptrs = out_ptr + b * out_sb + ch * out_sch + p * out_sp
    for _ in range(MAPS):
        total = tl.zeros(gate.shape, dtype=gate.dtype)
        row_ptrs = rel_ptrs
        for di in tl.static_range(CANDIDATES):  # raster order: a fixed order of additions
            ptrs = row_ptrs
            for dj in tl.static_range(CANDIDATES):
                chose = _chose(chosen_by, mask, di, dj, CANDIDATES)
                total += to_compute(tl.load(ptrs, mask=chose, other=0.0), IS_FP64)
                ptrs += rel_sw
            row_ptrs += rel_sh
        tl.store(out_ptrs, (total * gate).to(out_ptr.dtype.element_ty), mask=mask)
        rel_ptrs += rel_sm
        out_ptrs += out_sm


@triton.jit(do_not_specialize=["MAPS"])
def _max_unpool_sum_bwd_kernel(
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
    """One lane per input element: grad_rel at every window that chose its pixel, and grad_act,
    grad_z at its pixel from q = sum over those windows and the maps of grad_out * rel.

    The windows are walked outermost, the maps inside, so that a map's pointers are not kept
    for every window; grad_out is read only where some window chose the pixel (elsewhere q and
    every gradient are 0), again for each further window that chose it (from cache). Traffic,
    in bytes per element per map, at most: reads s_grad_out + s_rel / 4 + (s_act + s_z + 8 / 4) / M,
    writes s_rel / 4 + (s_act + s_z) / M. At 128 registers in some NCHW specialisations
    (``bench/compile_table.py``), without spills."""
    ch, p, _ = tile_indices(BLOCK_C, BLOCK_P, CHANNELS_LAST)
    b = tl.program_id(2).to(tl.int64)
    mask = (ch < CHANNELS) & (p < HW)
    _, _, _, chosen_by, first_i, first_j = _windows(
        index_ptr, b, ch, p, mask, WIDTH, POOLED_H, POOLED_W, idx_sb, idx_sch, idx_sh, idx_sw,
        KERNEL, STRIDE, PADDING, CANDIDATES)
    act, denominator = _act_and_denominator(act_ptr, z_ptr, e_ptr, b, ch, p, mask, act_sb, act_sch, act_sp,
                                            z_sb, z_sch, z_sp, IS_FP64)
    gate = act / denominator
    rel_row = (rel_ptr + b * rel_sb + ch * rel_sch + first_i.to(tl.int64) * rel_sh
               + first_j.to(tl.int64) * rel_sw)
    gr_row = (grad_rel_ptr + b * gr_sb + ch * gr_sch + first_i.to(tl.int64) * gr_sh
              + first_j.to(tl.int64) * gr_sw)
    go_first_map = grad_out_ptr + b * go_sb + ch * go_sch + p * go_sp
    q = tl.zeros(act.shape, dtype=act.dtype)
    for di in tl.static_range(CANDIDATES):  # a fixed order of additions: bitwise reproducible
        rel_window, gr_window = rel_row, gr_row
        for dj in tl.static_range(CANDIDATES):
            chose = _chose(chosen_by, mask, di, dj, CANDIDATES)
            go_ptrs, rel_ptrs, gr_ptrs = go_first_map, rel_window, gr_window
            for _ in range(MAPS):
                grad_out = to_compute(tl.load(go_ptrs, mask=chose, other=0.0), IS_FP64)
                q += grad_out * to_compute(tl.load(rel_ptrs, mask=chose, other=0.0), IS_FP64)
                tl.store(gr_ptrs, (grad_out * gate).to(grad_rel_ptr.dtype.element_ty), mask=chose)
                go_ptrs += go_sm
                rel_ptrs += rel_sm
                gr_ptrs += gr_sm
            rel_window += rel_sw
            gr_window += gr_sw
        rel_row += rel_sh
        gr_row += gr_sh
    offset = b * ga_sb + ch * ga_sch + p * ga_sp
    tl.store(grad_act_ptr + offset, (q / denominator).to(grad_act_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_z_ptr + offset, (-q * act / (denominator * denominator)).to(grad_z_ptr.dtype.element_ty), mask=mask)


def max_unpool_sum_forward(rel, indices, act, z, e, kernel_size, stride, padding, wrap_triton=unwrapped):
    """``rel``: B x M x CH x h x w; ``indices``: B x CH x h x w (max_pool2d's); ``act``, ``z``:
    B x CH x H x W (flattenable H, W). Any strides. ``wrap_triton``: see ``_common``."""
    return launch_unpool_forward(_max_unpool_sum_fwd_kernel, rel, indices, act, z, e, kernel_size, stride, padding,
                                 wrap_triton)


def max_unpool_sum_backward(grad_out, rel, indices, act, z, e, kernel_size, stride, padding, wrap_triton=unwrapped):
    """(grad_rel, grad_act, grad_z) of ``max_unpool_sum_forward`` for ``grad_out`` (flattenable H, W)."""
    return launch_unpool_backward(_max_unpool_sum_bwd_kernel, grad_out, rel, indices, act, z, e, kernel_size, stride,
                                  padding, wrap_triton)
