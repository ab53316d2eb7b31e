"""Transition step: 2x2 average-pool spreading fused with the conv -> ReLU epsilon step.

    out[b, c, ch, y, x] = rel[b, c, ch, y // 2, x // 2] * act[b, ch, y, x] / (4 * stab(pre[b, ch, y, x]))

``rel`` is the summed quotient at the pool's output (the next block's input), ``act`` the
transition's ReLU output (the pool's input) and ``pre`` its conv output. Spreading through a
2x2/stride-2 average pool needs no convolution. Rows and columns an odd size left out of the
pool get nothing.
"""

import torch
import triton
import triton.language as tl

from ._common import scalars, block_size, stabilize, to_compute


@triton.jit
def _pool_spread_fwd_kernel(
    rel_ptr, act_ptr, pre_ptr, out_ptr,
    CLASSES, HEIGHT, WIDTH, POOLED_H, POOLED_W, e_ptr,
    rel_sb, rel_sc, rel_sch, rel_sh, rel_sw,
    act_sb, act_sch, act_sh, act_sw,
    pre_sb, pre_sch, pre_sh, pre_sw,
    IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_p = tl.program_id(0)
    e = to_compute(tl.load(e_ptr), IS_FP64)
    ch = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    p = (pid_p * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = p < HEIGHT * WIDTH
    y = p // WIDTH
    x = p % WIDTH
    inside = mask & (y < 2 * POOLED_H) & (x < 2 * POOLED_W)
    act = to_compute(tl.load(act_ptr + b * act_sb + ch * act_sch + y * act_sh + x * act_sw, mask=mask, other=0.0), IS_FP64)
    pre = to_compute(tl.load(pre_ptr + b * pre_sb + ch * pre_sch + y * pre_sh + x * pre_sw, mask=mask, other=0.0), IS_FP64)
    gate = tl.where(inside, act / (4.0 * stabilize(pre, e)), 0.0)
    rel_base = rel_ptr + b * rel_sb + ch * rel_sch + (y // 2) * rel_sh + (x // 2) * rel_sw
    channels = tl.num_programs(1)
    out_base = out_ptr + (b * CLASSES * channels + ch) * HEIGHT * WIDTH + p
    for c in range(CLASSES):
        rel = to_compute(tl.load(rel_base + c * rel_sc, mask=inside, other=0.0), IS_FP64)
        tl.store(out_base + c * channels * HEIGHT * WIDTH, (rel * gate).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pool_spread_bwd_kernel(
    grad_out_ptr, rel_ptr, act_ptr, pre_ptr, grad_rel_ptr, grad_act_ptr, grad_pre_ptr,
    CLASSES, HEIGHT, WIDTH, POOLED_H, POOLED_W, e_ptr,
    go_sb, go_sc, go_sch, go_sh, go_sw,
    rel_sb, rel_sc, rel_sch, rel_sh, rel_sw,
    act_sb, act_sch, act_sh, act_sw,
    pre_sb, pre_sch, pre_sh, pre_sw,
    IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    # One lane per pooled pixel, handling its 2x2 window: no two lanes write the same place.
    pid_p = tl.program_id(0)
    e = to_compute(tl.load(e_ptr), IS_FP64)
    ch = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    channels = tl.num_programs(1)
    q_index = (pid_p * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = q_index < POOLED_H * POOLED_W
    i = q_index // POOLED_W
    j = q_index % POOLED_W
    grad_rel_base = grad_rel_ptr + (b * CLASSES * channels + ch) * POOLED_H * POOLED_W + q_index
    for d in tl.static_range(4):
        y = 2 * i + d // 2
        x = 2 * j + d % 2
        act = to_compute(tl.load(act_ptr + b * act_sb + ch * act_sch + y * act_sh + x * act_sw, mask=mask, other=0.0), IS_FP64)
        pre = to_compute(tl.load(pre_ptr + b * pre_sb + ch * pre_sch + y * pre_sh + x * pre_sw, mask=mask, other=0.0), IS_FP64)
        denominator = 4.0 * stabilize(pre, e)
        gate = act / denominator
        q = tl.zeros([BLOCK], dtype=gate.dtype)
        for c in range(CLASSES):
            grad_out = to_compute(tl.load(grad_out_ptr + b * go_sb + c * go_sc + ch * go_sch + y * go_sh + x * go_sw,
                                          mask=mask, other=0.0), IS_FP64)
            rel = to_compute(tl.load(rel_ptr + b * rel_sb + c * rel_sc + ch * rel_sch + i * rel_sh + j * rel_sw,
                                     mask=mask, other=0.0), IS_FP64)
            q += grad_out * rel
            grad_rel_ptrs = grad_rel_base + c * channels * POOLED_H * POOLED_W
            if d == 0:
                total = grad_out * gate
            else:
                total = to_compute(tl.load(grad_rel_ptrs, mask=mask, other=0.0), IS_FP64) + grad_out * gate
            tl.store(grad_rel_ptrs, total.to(grad_rel_ptr.dtype.element_ty), mask=mask)
        offset = (b * channels + ch) * HEIGHT * WIDTH + y * WIDTH + x
        tl.store(grad_act_ptr + offset, (q / denominator).to(grad_act_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_pre_ptr + offset, (-q * gate / denominator * 4.0).to(grad_pre_ptr.dtype.element_ty), mask=mask)


def _strides(t):
    return [t.stride(d) for d in range(t.dim())]


def pool_spread_forward(rel, act, pre, e):
    """``rel``: B x C x CH x h x w; ``act``, ``pre``: B x CH x H x W with H >= 2h, W >= 2w."""
    batch, classes, channels, pooled_h, pooled_w = rel.shape
    height, width = act.shape[-2:]
    out = torch.empty((batch, classes, channels, height, width), dtype=rel.dtype, device=rel.device)
    block = block_size(height * width)
    _pool_spread_fwd_kernel[(triton.cdiv(height * width, block), channels, batch)](
        rel, act, pre, out, classes, height, width, pooled_h, pooled_w, scalars([e], rel),
        *_strides(rel), *_strides(act), *_strides(pre), IS_FP64=rel.dtype == torch.float64, BLOCK=block,
    )
    return out


def pool_spread_backward(grad_out, rel, act, pre, e):
    batch, classes, channels, pooled_h, pooled_w = rel.shape
    height, width = act.shape[-2:]
    grad_rel = torch.empty((batch, classes, channels, pooled_h, pooled_w), dtype=rel.dtype, device=rel.device)
    # pixels the pool left out (odd sizes) get no gradient: start from zeros
    grad_act = torch.zeros((batch, channels, height, width), dtype=act.dtype, device=act.device)
    grad_pre = torch.zeros((batch, channels, height, width), dtype=pre.dtype, device=pre.device)
    block = block_size(pooled_h * pooled_w)
    _pool_spread_bwd_kernel[(triton.cdiv(pooled_h * pooled_w, block), channels, batch)](
        grad_out, rel, act, pre, grad_rel, grad_act, grad_pre, classes, height, width, pooled_h, pooled_w, scalars([e], rel),
        *_strides(grad_out), *_strides(rel), *_strides(act), *_strides(pre),
        IS_FP64=rel.dtype == torch.float64, BLOCK=block,
    )
    return grad_rel, grad_act, grad_pre
