"""Helpers shared by the kernels: compute dtype, the LRP stabiliser, launch sizes."""

import torch
import triton
import triton.language as tl

MAX_BLOCK = 1024


@triton.jit
def to_compute(x, IS_FP64: tl.constexpr):
    """fp32 arithmetic for fp32/fp16/bf16 tensors, fp64 for float64 ones (parity tests)."""
    if IS_FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def stabilize(z, e):
    """z + e * sign(z), with sign(0) = +1, as the original's epsilon rule."""
    return tl.where(z >= 0, z + e, z - e)


def scalars(values, like):
    """Runtime scalars as a tensor in the compute dtype: Triton would pass Python floats as fp32,
    and fp64 tensors need them exact."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.tensor(values, dtype=dtype, device=like.device)


def block_size(n: int) -> int:
    """Elements per program: the whole spatial extent up to MAX_BLOCK (few programs in the interpreter)."""
    return min(MAX_BLOCK, triton.next_power_of_2(max(int(n), 1)))


def spatial_strides(t, dims):
    """Strides of ``t``'s leading dims and of its flattened spatial (last two) dims.

    The kernels index the spatial dims as one; that needs stride(H) == W * stride(W), which
    holds for slices along channels, split chunks and expanded (stride 0) broadcasts.
    """
    height, width = t.shape[-2:]
    if height > 1 and t.stride(-2) != width * t.stride(-1):
        raise ValueError("spatial dims must be flattenable; call .contiguous() first")
    return [t.stride(d) for d in range(dims)] + [t.stride(-1)]
