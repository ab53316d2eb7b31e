"""Stem step: max-pool un-pooling with the original's overwrite rule, fused with the
conv -> BatchNorm -> ReLU epsilon step (its stabilised denominator given as ``z``).

    out[b, c, ch, p] = rel[b, c, ch, winner(p)] * act[b, ch, p] / stab(z[b, ch, p])   (0 without a winner)

winner(p) is the last pooled position, in raster order, whose window chose input pixel p:
what the original's ``max_unpool2d`` leaves on the CPU, where later writes overwrite earlier
ones. Each lane gathers over the few windows that contain its pixel, so there are no atomics
and no races, and every run gives the same bits on any device. The backward gives each pooled
position the gradient at the pixel it chose, overwritten or not, as the original's autograd does.
"""

import torch
import triton
import triton.language as tl

from ._common import scalars, block_size, stabilize, to_compute


@triton.jit
def _winner(index_base, y, x, mask, POOLED_H, POOLED_W, WIDTH,
            KERNEL: tl.constexpr, STRIDE: tl.constexpr, PADDING: tl.constexpr, CANDIDATES: tl.constexpr):
    """Largest pooled position whose window holds (y, x) and chose it; -1 if none."""
    winner = tl.full(y.shape, -1, tl.int64)
    top = (y + PADDING) // STRIDE
    left = (x + PADDING) // STRIDE
    pixel = y * WIDTH + x
    for di in tl.static_range(CANDIDATES):
        i = top - (CANDIDATES - 1) + di
        for dj in tl.static_range(CANDIDATES):
            j = left - (CANDIDATES - 1) + dj
            covers = (i >= 0) & (i < POOLED_H) & (j >= 0) & (j < POOLED_W) \
                & (i * STRIDE - PADDING + KERNEL > y) & (j * STRIDE - PADDING + KERNEL > x) & mask
            position = i * POOLED_W + j
            chosen = tl.load(index_base + position, mask=covers, other=-1)
            winner = tl.where(covers & (chosen == pixel), position, winner)
    return winner


@triton.jit
def _pixel_prologue(rel_ptr, index_ptr, act_ptr, z_ptr, e_ptr, HEIGHT, WIDTH, POOLED_H, POOLED_W, rel_sb, rel_sch,
                    KERNEL: tl.constexpr, STRIDE: tl.constexpr, PADDING: tl.constexpr, CANDIDATES: tl.constexpr,
                    IS_FP64: tl.constexpr, BLOCK: tl.constexpr):
    """This program's input pixels: their winners, where the winners' relevance sits (class 0),
    and the activation and stabilised denominator at each pixel."""
    b = tl.program_id(2).to(tl.int64)
    ch = tl.program_id(1).to(tl.int64)
    channels = tl.num_programs(1)
    hw = HEIGHT * WIDTH
    p = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = p < hw
    plane = b * channels + ch
    winner = _winner(index_ptr + plane * POOLED_H * POOLED_W, p // WIDTH, p % WIDTH, mask, POOLED_H, POOLED_W,
                     WIDTH, KERNEL, STRIDE, PADDING, CANDIDATES)
    found = winner >= 0
    rel_base = rel_ptr + b * rel_sb + ch * rel_sch + tl.where(found, winner, 0)
    act = to_compute(tl.load(act_ptr + plane * hw + p, mask=mask, other=0.0), IS_FP64)
    z = to_compute(tl.load(z_ptr + plane * hw + p, mask=mask, other=0.0), IS_FP64)
    return b, ch, channels, p, mask, found, rel_base, act, stabilize(z, to_compute(tl.load(e_ptr), IS_FP64))


@triton.jit
def _max_unpool_fwd_kernel(
    rel_ptr, index_ptr, act_ptr, z_ptr, out_ptr,
    CLASSES, HEIGHT, WIDTH, POOLED_H, POOLED_W, e_ptr,
    rel_sb, rel_sc, rel_sch,
    KERNEL: tl.constexpr, STRIDE: tl.constexpr, PADDING: tl.constexpr, CANDIDATES: tl.constexpr,
    IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    # rel's pooled dims are contiguous (stride w, 1); index, act, z, out are contiguous.
    b, ch, channels, p, mask, found, rel_base, act, denominator = _pixel_prologue(
        rel_ptr, index_ptr, act_ptr, z_ptr, e_ptr, HEIGHT, WIDTH, POOLED_H, POOLED_W, rel_sb, rel_sch,
        KERNEL, STRIDE, PADDING, CANDIDATES, IS_FP64, BLOCK)
    hw = HEIGHT * WIDTH
    gate = act / denominator
    out_base = out_ptr + (b * CLASSES * channels + ch) * hw + p
    for c in range(CLASSES):
        rel = to_compute(tl.load(rel_base + c * rel_sc, mask=mask & found, other=0.0), IS_FP64)
        tl.store(out_base + c * channels * hw, (rel * gate).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _max_unpool_bwd_rel_kernel(
    grad_out_ptr, index_ptr, act_ptr, z_ptr, grad_rel_ptr,
    CLASSES, HW, POOLED_HW, e_ptr,
    IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    # One lane per pooled position: gather the gradient at the pixel it chose.
    pid_p = tl.program_id(0)
    e = to_compute(tl.load(e_ptr), IS_FP64)
    ch = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    channels = tl.num_programs(1)
    q = (pid_p * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = q < POOLED_HW
    plane = b * channels + ch
    pixel = tl.load(index_ptr + plane * POOLED_HW + q, mask=mask, other=0)
    act = to_compute(tl.load(act_ptr + plane * HW + pixel, mask=mask, other=0.0), IS_FP64)
    z = to_compute(tl.load(z_ptr + plane * HW + pixel, mask=mask, other=0.0), IS_FP64)
    gate = act / stabilize(z, e)
    for c in range(CLASSES):
        row = (b * CLASSES + c) * channels + ch
        grad_out = to_compute(tl.load(grad_out_ptr + row * HW + pixel, mask=mask, other=0.0), IS_FP64)
        tl.store(grad_rel_ptr + row * POOLED_HW + q, (grad_out * gate).to(grad_rel_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _max_unpool_bwd_act_kernel(
    grad_out_ptr, rel_ptr, index_ptr, act_ptr, z_ptr, grad_act_ptr, grad_z_ptr,
    CLASSES, HEIGHT, WIDTH, POOLED_H, POOLED_W, e_ptr,
    rel_sb, rel_sc, rel_sch,
    KERNEL: tl.constexpr, STRIDE: tl.constexpr, PADDING: tl.constexpr, CANDIDATES: tl.constexpr,
    IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    b, ch, channels, p, mask, found, rel_base, act, denominator = _pixel_prologue(
        rel_ptr, index_ptr, act_ptr, z_ptr, e_ptr, HEIGHT, WIDTH, POOLED_H, POOLED_W, rel_sb, rel_sch,
        KERNEL, STRIDE, PADDING, CANDIDATES, IS_FP64, BLOCK)
    hw = HEIGHT * WIDTH
    plane = b * channels + ch
    q = tl.zeros([BLOCK], dtype=act.dtype)
    for c in range(CLASSES):
        rel = to_compute(tl.load(rel_base + c * rel_sc, mask=mask & found, other=0.0), IS_FP64)
        grad_out = to_compute(tl.load(grad_out_ptr + ((b * CLASSES + c) * channels + ch) * hw + p,
                                      mask=mask, other=0.0), IS_FP64)
        q += grad_out * rel
    tl.store(grad_act_ptr + plane * hw + p, (q / denominator).to(grad_act_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_z_ptr + plane * hw + p, (-q * act / (denominator * denominator)).to(grad_z_ptr.dtype.element_ty),
             mask=mask)


def _geometry(kernel_size, stride, padding):
    return dict(KERNEL=kernel_size, STRIDE=stride, PADDING=padding, CANDIDATES=triton.cdiv(kernel_size, stride))


def _check_pooled(rel):
    if rel.stride(-1) != 1 or rel.stride(-2) != rel.shape[-1]:
        rel = rel.contiguous()
    return rel


def max_unpool_forward(rel, indices, act, z, e, kernel_size, stride, padding):
    """``rel``: B x C x CH x h x w; ``indices``: B x CH x h x w (max_pool2d's); ``act``, ``z``:
    B x CH x H x W. Square pooling windows, dilation 1."""
    rel = _check_pooled(rel)
    indices, act, z = indices.contiguous(), act.contiguous(), z.contiguous()
    batch, classes, channels, pooled_h, pooled_w = rel.shape
    height, width = act.shape[-2:]
    out = torch.empty((batch, classes, channels, height, width), dtype=rel.dtype, device=rel.device)
    block = block_size(height * width)
    _max_unpool_fwd_kernel[(triton.cdiv(height * width, block), channels, batch)](
        rel, indices, act, z, out, classes, height, width, pooled_h, pooled_w, scalars([e], rel),
        rel.stride(0), rel.stride(1), rel.stride(2), **_geometry(kernel_size, stride, padding),
        IS_FP64=rel.dtype == torch.float64, BLOCK=block,
    )
    return out


def max_unpool_backward(grad_out, rel, indices, act, z, e, kernel_size, stride, padding):
    rel = _check_pooled(rel)
    grad_out, indices, act, z = grad_out.contiguous(), indices.contiguous(), act.contiguous(), z.contiguous()
    batch, classes, channels, pooled_h, pooled_w = rel.shape
    height, width = act.shape[-2:]
    grad_rel = torch.empty((batch, classes, channels, pooled_h, pooled_w), dtype=rel.dtype, device=rel.device)
    grad_act = torch.empty_like(act)
    grad_z = torch.empty_like(z)
    is_fp64 = rel.dtype == torch.float64
    block = block_size(pooled_h * pooled_w)
    _max_unpool_bwd_rel_kernel[(triton.cdiv(pooled_h * pooled_w, block), channels, batch)](
        grad_out, indices, act, z, grad_rel, classes, height * width, pooled_h * pooled_w, scalars([e], rel),
        IS_FP64=is_fp64, BLOCK=block,
    )
    block = block_size(height * width)
    _max_unpool_bwd_act_kernel[(triton.cdiv(height * width, block), channels, batch)](
        grad_out, rel, indices, act, z, grad_act, grad_z, classes, height, width, pooled_h, pooled_w, scalars([e], rel),
        rel.stride(0), rel.stride(1), rel.stride(2), **_geometry(kernel_size, stride, padding),
        IS_FP64=is_fp64, BLOCK=block,
    )
    return grad_rel, grad_act, grad_z
