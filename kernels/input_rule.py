"""Input step: combine the stem's transposed convolution into the heatmap.

    heat[b, c, i, p] = x[b, i, p] * back[b, c, i, p] - K1 * back[b, c, CIN + i, p] - K2 * back[b, c, 2 CIN + i, p]

``back`` holds, along channels, the transposed convolution with the folded weights, then for
the z^B rule the ones with the parts of the weights clipped at each nonzero pixel bound
(coefficients K1, K2: the bounds). The epsilon rule has the first part only.
"""

import torch
import triton
import triton.language as tl

from ._common import scalars, block_size, to_compute


@triton.jit
def _input_rule_fwd_kernel(
    back_ptr, x_ptr, out_ptr, CLASSES, HW, coefficient_ptr,
    PARTS: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    # all tensors contiguous; back has PARTS * CIN channels
    pid_p = tl.program_id(0)
    K1 = to_compute(tl.load(coefficient_ptr), IS_FP64)
    K2 = to_compute(tl.load(coefficient_ptr + 1), IS_FP64)
    i = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    cin = tl.num_programs(1)
    p = (pid_p * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = p < HW
    x = to_compute(tl.load(x_ptr + (b * cin + i) * HW + p, mask=mask, other=0.0), IS_FP64)
    for c in range(CLASSES):
        row = (b * CLASSES + c) * PARTS * cin
        heat = x * to_compute(tl.load(back_ptr + (row + i) * HW + p, mask=mask, other=0.0), IS_FP64)
        if PARTS >= 2:
            heat -= K1 * to_compute(tl.load(back_ptr + (row + cin + i) * HW + p, mask=mask, other=0.0), IS_FP64)
        if PARTS == 3:
            heat -= K2 * to_compute(tl.load(back_ptr + (row + 2 * cin + i) * HW + p, mask=mask, other=0.0), IS_FP64)
        tl.store(out_ptr + ((b * CLASSES + c) * cin + i) * HW + p, heat.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _input_rule_bwd_kernel(
    grad_out_ptr, back_ptr, x_ptr, grad_back_ptr, grad_x_ptr, CLASSES, HW, coefficient_ptr,
    PARTS: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_p = tl.program_id(0)
    K1 = to_compute(tl.load(coefficient_ptr), IS_FP64)
    K2 = to_compute(tl.load(coefficient_ptr + 1), IS_FP64)
    i = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    cin = tl.num_programs(1)
    p = (pid_p * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = p < HW
    x = to_compute(tl.load(x_ptr + (b * cin + i) * HW + p, mask=mask, other=0.0), IS_FP64)
    grad_x = tl.zeros([BLOCK], dtype=x.dtype)
    for c in range(CLASSES):
        grad = to_compute(tl.load(grad_out_ptr + ((b * CLASSES + c) * cin + i) * HW + p, mask=mask, other=0.0), IS_FP64)
        row = (b * CLASSES + c) * PARTS * cin
        back = to_compute(tl.load(back_ptr + (row + i) * HW + p, mask=mask, other=0.0), IS_FP64)
        grad_x += grad * back
        tl.store(grad_back_ptr + (row + i) * HW + p, (grad * x).to(grad_back_ptr.dtype.element_ty), mask=mask)
        if PARTS >= 2:
            tl.store(grad_back_ptr + (row + cin + i) * HW + p, (-K1 * grad).to(grad_back_ptr.dtype.element_ty), mask=mask)
        if PARTS == 3:
            tl.store(grad_back_ptr + (row + 2 * cin + i) * HW + p, (-K2 * grad).to(grad_back_ptr.dtype.element_ty),
                     mask=mask)
    tl.store(grad_x_ptr + (b * cin + i) * HW + p, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _parts(back, x, coefficients):
    parts = back.shape[2] // x.shape[1]
    if back.shape[2] != parts * x.shape[1] or parts != 1 + len(coefficients) or parts > 3:
        raise ValueError(f"back has {back.shape[2]} channels: expected {1 + len(coefficients)} parts "
                         f"of {x.shape[1]} (one, plus one per coefficient, at most three)")
    return parts, [float(k) for k in coefficients] + [0.0] * (2 - len(coefficients))


def input_rule_forward(back, x, coefficients=()):
    """``back``: B x C x (PARTS*CIN) x H x W; ``x``: B x CIN x H x W; ``coefficients``: what
    each extra part is subtracted with (the z^B rule's nonzero bounds)."""
    back, x = back.contiguous(), x.contiguous()
    parts, (k1, k2) = _parts(back, x, coefficients)
    batch, classes = back.shape[:2]
    cin, height, width = x.shape[1:]
    out = torch.empty((batch, classes, cin, height, width), dtype=back.dtype, device=back.device)
    block = block_size(height * width)
    _input_rule_fwd_kernel[(triton.cdiv(height * width, block), cin, batch)](
        back, x, out, classes, height * width, scalars([k1, k2], back),
        PARTS=parts, IS_FP64=back.dtype == torch.float64, BLOCK=block,
    )
    return out


def input_rule_backward(grad_out, back, x, coefficients=()):
    grad_out, back, x = grad_out.contiguous(), back.contiguous(), x.contiguous()
    parts, (k1, k2) = _parts(back, x, coefficients)
    batch, classes = back.shape[:2]
    cin, height, width = x.shape[1:]
    grad_back = torch.empty_like(back)
    grad_x = torch.empty_like(x)
    block = block_size(height * width)
    _input_rule_bwd_kernel[(triton.cdiv(height * width, block), cin, batch)](
        grad_out, back, x, grad_back, grad_x, classes, height * width, scalars([k1, k2], back),
        PARTS=parts, IS_FP64=back.dtype == torch.float64, BLOCK=block,
    )
    return grad_back, grad_x
