"""The stem both architectures share: input conv, BatchNorm, ReLU and max pool.

The plans check the pool with :func:`check_stem_pool`; the passes end with
:func:`pooled_stem_relevance`, from the quotient at the pool's output to the input heatmaps.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from . import UnsupportedModelError
from .rules import conv_transpose, input_layer_terms
from .torch_ops import merge_batch_and_classes, split_batch_and_classes


def check_stem_pool(pool: nn.MaxPool2d, name: str) -> None:
    """Raises UnsupportedModelError unless the pool has square settings and dilation 1, what the
    un-pooling kernels read."""
    for what in ("kernel_size", "stride", "padding"):
        pair = nn.modules.utils._pair(getattr(pool, what))
        if pair[0] != pair[1]:
            raise UnsupportedModelError(f"{name!r} must have a square {what}, got {pair}")
    if nn.modules.utils._pair(pool.dilation) != (1, 1):
        raise UnsupportedModelError(f"{name!r} must have dilation 1 (its un-pooling reads undilated windows), "
                                    f"got {pool.dilation}")


def pool_geometry(pool: nn.MaxPool2d) -> Tuple[int, int, int]:
    """Kernel, stride and padding of a pool :func:`check_stem_pool` accepted."""
    return tuple(nn.modules.utils._pair(v)[0] for v in (pool.kernel_size, pool.stride, pool.padding))


def pooled_stem_relevance(conv: nn.Conv2d, bn: nn.BatchNorm2d, pool: nn.MaxPool2d, x: torch.Tensor,
                          conv_out: torch.Tensor, relu_out: torch.Tensor, pool_indices: torch.Tensor,
                          quotient: torch.Tensor, e: float, zb: bool, ops, overwrite_unpool: bool) -> torch.Tensor:
    """Heatmaps ``B x M x C x H x W`` from the quotient at the max pool's output, ``B x M x K x h x w``.

    The un-pooling (the original's overwrite rule, or summing where ``overwrite_unpool`` is False)
    fused with the stem conv's epsilon step, one transposed convolution (of the z^B rule's three
    weights side by side where ``zb``), and the input rule.
    """
    z, weights, coefficients = input_layer_terms(conv, bn, x, conv_out, zb)
    kernel, stride, padding = pool_geometry(pool)
    unpooled = ops.max_unpool_gated(quotient, pool_indices, relu_out, z, e, kernel, stride, padding,
                                    overwrite=overwrite_unpool)
    back = conv_transpose(conv, merge_batch_and_classes(unpooled), x.shape[-2:], torch.cat(weights, dim=1))
    return ops.input_rule(split_batch_and_classes(back, x.shape[0]), x, coefficients)
