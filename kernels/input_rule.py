"""Input step: combine the stem's transposed convolution into the heatmap.

    heat[b, m, i, p] = x[b, i, p] * back[b, m, i, p] - K1 * back[b, m, CIN + i, p] - K2 * back[b, m, 2 CIN + i, p]

``back`` holds, along channels, the transposed convolution with the folded weights, then for
the z^B rule the ones with the parts of the weights clipped at each nonzero pixel bound
(coefficients K1, K2: the bounds). The epsilon rule has the first part only.

Any strides with flattenable H, W; tiles follow ``x``'s layout and the outputs take it.
"""

import torch
import triton
import triton.language as tl

from ._common import (MAX_REGISTERS, channels_innermost, empty, grid, scalars, spatial_strides, tile, tile_indices,
                      to_compute, unwrapped, wide)


@triton.jit(do_not_specialize=["MAPS"])
def _input_rule_fwd_kernel(
    back_ptr, x_ptr, out_ptr, coefficient_ptr,
    MAPS, CIN, HW,
    back_sb, back_sm, back_sch, back_sp,
    x_sb, x_sch, x_sp,
    out_sb, out_sm, out_sch, out_sp,
    PARTS: tl.constexpr, IS_FP64: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Traffic, in bytes per element (b, i, p) per map: reads PARTS * s_back + s_x / M, writes
    s_out. The minimum."""
    i, p, _ = tile_indices(BLOCK_C, BLOCK_P, CHANNELS_LAST)
    b = tl.program_id(2).to(tl.int64)
    mask = (i < CIN) & (p < HW)
    K1 = to_compute(tl.load(coefficient_ptr), IS_FP64)
    K2 = to_compute(tl.load(coefficient_ptr + 1), IS_FP64)
    x = to_compute(tl.load(x_ptr + b * x_sb + i * x_sch + p * x_sp, mask=mask, other=0.0), IS_FP64)
    back_ptrs = back_ptr + b * back_sb + i * back_sch + p * back_sp
    part = wide(CIN) * back_sch  # from one part to the next
    out_ptrs = out_ptr + b * out_sb + i * out_sch + p * out_sp
    for _ in range(MAPS):
        heat = x * to_compute(tl.load(back_ptrs, mask=mask, other=0.0), IS_FP64)
        if PARTS >= 2:
            heat -= K1 * to_compute(tl.load(back_ptrs + part, mask=mask, other=0.0), IS_FP64)
        if PARTS == 3:
            heat -= K2 * to_compute(tl.load(back_ptrs + 2 * part, mask=mask, other=0.0), IS_FP64)
        tl.store(out_ptrs, heat.to(out_ptr.dtype.element_ty), mask=mask)
        back_ptrs += back_sm
        out_ptrs += out_sm


@triton.jit(do_not_specialize=["MAPS"])
def _input_rule_bwd_kernel(
    grad_out_ptr, back_ptr, x_ptr, grad_back_ptr, grad_x_ptr, coefficient_ptr,
    MAPS, CIN, HW,
    go_sb, go_sm, go_sch, go_sp,
    back_sb, back_sm, back_sch, back_sp,
    x_sb, x_sch, x_sp,
    gb_sb, gb_sm, gb_sch, gb_sp,
    gx_sb, gx_sch, gx_sp,
    PARTS: tl.constexpr, IS_FP64: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Traffic, in bytes per element per map: reads s_grad_out + s_back (its first part only: the
    others do not enter the gradient) + s_x / M, writes PARTS * s_back + s_x / M (grad_back,
    grad_x). The minimum."""
    i, p, _ = tile_indices(BLOCK_C, BLOCK_P, CHANNELS_LAST)
    b = tl.program_id(2).to(tl.int64)
    mask = (i < CIN) & (p < HW)
    K1 = to_compute(tl.load(coefficient_ptr), IS_FP64)
    K2 = to_compute(tl.load(coefficient_ptr + 1), IS_FP64)
    x = to_compute(tl.load(x_ptr + b * x_sb + i * x_sch + p * x_sp, mask=mask, other=0.0), IS_FP64)
    grad_x = tl.zeros(x.shape, dtype=x.dtype)
    go_ptrs = grad_out_ptr + b * go_sb + i * go_sch + p * go_sp
    back_ptrs = back_ptr + b * back_sb + i * back_sch + p * back_sp
    gb_ptrs = grad_back_ptr + b * gb_sb + i * gb_sch + p * gb_sp
    part = wide(CIN) * gb_sch
    for _ in range(MAPS):
        grad = to_compute(tl.load(go_ptrs, mask=mask, other=0.0), IS_FP64)
        grad_x += grad * to_compute(tl.load(back_ptrs, mask=mask, other=0.0), IS_FP64)
        tl.store(gb_ptrs, (grad * x).to(grad_back_ptr.dtype.element_ty), mask=mask)
        if PARTS >= 2:
            tl.store(gb_ptrs + part, (-K1 * grad).to(grad_back_ptr.dtype.element_ty), mask=mask)
        if PARTS == 3:
            tl.store(gb_ptrs + 2 * part, (-K2 * grad).to(grad_back_ptr.dtype.element_ty), mask=mask)
        go_ptrs += go_sm
        back_ptrs += back_sm
        gb_ptrs += gb_sm
    tl.store(grad_x_ptr + b * gx_sb + i * gx_sch + p * gx_sp, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _parts(back, x, coefficients):
    parts = back.shape[2] // x.shape[1]
    if back.shape[2] != parts * x.shape[1] or parts != 1 + len(coefficients) or parts > 3:
        raise ValueError(f"back has {back.shape[2]} channels: expected {1 + len(coefficients)} parts "
                         f"of {x.shape[1]} (one, plus one per coefficient, at most three)")
    return parts, [float(k) for k in coefficients] + [0.0] * (2 - len(coefficients))


def _layout(back, x):
    if x.shape[1] > 1 and x.shape[-2] * x.shape[-1] > 1:
        return channels_innermost(x, 1)
    return channels_innermost(back, 2)


def input_rule_forward(back, x, coefficients=(), wrap_triton=unwrapped):
    """``back``: B x M x (PARTS*CIN) x H x W; ``x``: B x CIN x H x W; ``coefficients``: what
    each extra part is subtracted with (the z^B rule's nonzero bounds)."""
    parts, (k1, k2) = _parts(back, x, coefficients)
    batch, maps = back.shape[:2]
    cin, height, width = x.shape[1:]
    hw = height * width
    channels_last = _layout(back, x)
    out = empty((batch, maps, cin, height, width), back.dtype, back.device, channels_last)
    block_c, block_p, warps = tile(cin, hw, channels_last, back.dtype, x.dtype)
    wrap_triton(_input_rule_fwd_kernel)[grid(cin, hw, batch, block_c, block_p)](
        back, x, out, scalars([k1, k2], back), maps, cin, hw,
        *spatial_strides(back, 3), *spatial_strides(x, 2), *spatial_strides(out, 3),
        PARTS=parts, IS_FP64=back.dtype == torch.float64, CHANNELS_LAST=channels_last,
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps, maxnreg=MAX_REGISTERS,
    )
    return out


def input_rule_backward(grad_out, back, x, coefficients=(), wrap_triton=unwrapped):
    parts, (k1, k2) = _parts(back, x, coefficients)
    batch, maps = back.shape[:2]
    cin, height, width = x.shape[1:]
    hw = height * width
    channels_last = _layout(back, x)
    grad_back = empty(tuple(back.shape), back.dtype, back.device, channels_last)
    grad_x = empty(tuple(x.shape), x.dtype, x.device, channels_last)
    block_c, block_p, warps = tile(cin, hw, channels_last, back.dtype, x.dtype)
    wrap_triton(_input_rule_bwd_kernel)[grid(cin, hw, batch, block_c, block_p)](
        grad_out, back, x, grad_back, grad_x, scalars([k1, k2], back), maps, cin, hw,
        *spatial_strides(grad_out, 3), *spatial_strides(back, 3), *spatial_strides(x, 2),
        *spatial_strides(grad_back, 3), *spatial_strides(grad_x, 2),
        PARTS=parts, IS_FP64=back.dtype == torch.float64, CHANNELS_LAST=channels_last,
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps, maxnreg=MAX_REGISTERS,
    )
    return grad_back, grad_x
