"""Helpers shared by the kernels: compute dtype, the LRP stabiliser, tiles, layouts, launch sizes.

Every kernel works on tiles of (channel, pixel) pairs of ``... x CH x H x W`` tensors, the H and
W dims flattened into one pixel index. Which of the two is contiguous in memory decides the
tile's orientation (``CHANNELS_LAST``): channels innermost (channels_last tensors) puts channels
on the tile's fast axis, NCHW puts pixels there, so that consecutive lanes read consecutive
addresses either way. Offsets are int64 throughout: program ids and aranges are widened before
any multiplication, so no index product is ever formed in int32 (``tests/test_compile.py``
checks the compiled TTIR for that).

Every launcher takes ``wrap_triton``, applied to its kernel before ``[grid](...)``: the kernel
itself by default, ``torch.library.wrap_triton`` (or a wrapper of it) where the launcher runs
inside a ``torch.library.triton_op`` (``isnet_fast.engine.triton_ops``), so that tracing records the
launch. The parameter bears torch's name because torch finds a triton_op's kernels (for
AOTAutograd's cache key) by looking for calls so named in its source.
"""

import functools

import torch
import triton
import triton.language as tl

THREADS_PER_WARP = 32
MAX_WARPS = 4
# ``maxnreg`` of every launch: a ceiling, not a target. Without it ptxas may pick a lower register
# count for occupancy on its own and spill a value or two to meet it (seen on sm_80); with it the
# kernels use what they need, 40-100 registers (``bench/compile_table.py``), and never spill.
MAX_REGISTERS = 128
# 2**31: beyond it int32 coordinates (pixel rows and columns, never offsets) would wrap
MAX_PLANE = 2 ** 31 - 1


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


@triton.jit
def wide(x):
    """``x`` as int64, for a runtime int or a constexpr alike (Triton specialises ints equal to 1)."""
    return x + tl.zeros([], dtype=tl.int64)


@triton.jit
def tile_indices(BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """This program's channels and pixels (int64): grid axis 0 walks pixel blocks, axis 1 channel
    blocks. Returns (ch, p) shaped to broadcast into the tile, ``[BLOCK_P, BLOCK_C]`` with the
    channels last (fast) or ``[BLOCK_C, BLOCK_P]`` with the pixels last, and the 1-D channel
    vector for per-channel loads and reductions."""
    ch = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    if CHANNELS_LAST:
        return ch[None, :], p[:, None], ch
    else:
        return ch[:, None], p[None, :], ch


@triton.jit
def sum_over_pixels(x, CHANNELS_LAST: tl.constexpr):
    """Per-channel sums over a tile's pixels (a fixed-order tree: bitwise reproducible)."""
    if CHANNELS_LAST:
        return tl.sum(x, axis=0)
    else:
        return tl.sum(x, axis=1)


def unwrapped(kernel):
    """The launchers' default ``wrap_triton``: launch the kernel as it is."""
    return kernel


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=64)
def _scalars(values, dtype, device):
    return torch.tensor(values, dtype=dtype, device=device)


def scalars(values, like):
    """Runtime scalars as a tensor in the compute dtype: Triton would pass Python floats as fp32,
    and fp64 tensors need them exact. Cached per value and device: one host-to-device copy, not
    one per launch; not while traced (fake or functional tensors, a dispatch mode on), where a
    cached tensor would belong to the trace and outlive it."""
    values, dtype = tuple(float(v) for v in values), compute_dtype(like.dtype)
    if type(like) is not torch.Tensor or torch._C._len_torch_dispatch_stack() > 0:
        return torch.tensor(values, dtype=dtype, device=like.device)
    return _scalars(values, dtype, like.device)


def channels_innermost(t: torch.Tensor, channel_dim: int) -> bool:
    """Whether ``t``'s channels are contiguous (channels_last storage), where that is a choice:
    more than one channel and more than one pixel."""
    pixels = t.shape[-2] * t.shape[-1]
    return t.shape[channel_dim] > 1 and pixels > 1 and t.stride(channel_dim) == 1


def empty(shape, dtype, device, channels_last: bool) -> torch.Tensor:
    """``torch.empty(shape)`` with the channels (dim -3) innermost when ``channels_last``: for 4-D
    shapes the strides of ``torch.channels_last``, for ``B x M x CH x H x W`` the same per map."""
    if not channels_last:
        return torch.empty(shape, dtype=dtype, device=device)
    *lead, channels, height, width = shape
    return torch.empty((*lead, height, width, channels), dtype=dtype, device=device).movedim(-1, -3)


def spatial_strides(t, dims):
    """Strides of ``t``'s leading dims and of its flattened spatial (last two) dims.

    The kernels index the spatial dims as one; that needs stride(H) == W * stride(W), which
    holds for both layouts, slices along channels, split chunks and expanded (stride 0) broadcasts.
    """
    height, width = t.shape[-2:]
    if height > 1 and t.stride(-2) != width * t.stride(-1):
        raise ValueError("spatial dims must be flattenable; call .contiguous() first")
    return [t.stride(d) for d in range(dims)] + [t.stride(-1)]


def check_plane(height: int, width: int) -> None:
    if height * width > MAX_PLANE:
        raise ValueError(f"{height}x{width} pixels per plane: the kernels address at most 2**31 - 1")


def tile(channels: int, pixels: int, channels_last: bool, *dtypes: torch.dtype, live: int = 1):
    """``(BLOCK_C, BLOCK_P, num_warps)`` for a ``channels x pixels`` plane of tensors of ``dtypes``.

    Each lane holds 16 bytes' worth of compute-dtype values (four in fp32, two in fp64), divided
    by ``live`` for kernels that keep several values per element: about 32 registers of data per
    lane, which leaves the rest of 128 for addresses. The fast axis (channels when
    ``channels_last``, else pixels) gets up to one warp of such vectors, the other axis fills
    ``MAX_WARPS`` warps. Small planes get fewer warps, so that no two lanes hold the same
    element (at 7x7 NCHW a 64-wide row is a quarter masked, never duplicated).
    """
    compute_bytes = 8 if torch.float64 in dtypes else 4
    per_thread = max(1, 16 // compute_bytes // live)
    smallest = min(torch.empty((), dtype=d).element_size() for d in dtypes)
    vector = max(1, min(per_thread, 16 // smallest))
    fast, slow = (channels, pixels) if channels_last else (pixels, channels)
    block_fast = min(triton.next_power_of_2(max(fast, 1)), THREADS_PER_WARP * vector)
    elements = MAX_WARPS * THREADS_PER_WARP * per_thread
    block_slow = min(triton.next_power_of_2(max(slow, 1)), max(1, elements // block_fast))
    # as many warps as the tile fills with a vector per lane, at least one
    warps = MAX_WARPS
    while warps > 1 and block_fast * block_slow < warps * THREADS_PER_WARP * min(vector, block_fast):
        warps //= 2
    if channels_last:
        return block_fast, block_slow, warps
    return block_slow, block_fast, warps


def grid(channels: int, pixels: int, batch: int, block_c: int, block_p: int):
    return (triton.cdiv(pixels, block_p), triton.cdiv(channels, block_c), batch)
