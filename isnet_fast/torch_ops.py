"""The relevance pass's elementwise steps in plain torch ops: the CPU backend, and the
obviously-correct versions the Triton kernels are tested against.

Shapes: relevance ``B x C x ch x H x W`` (one per class); activations ``B x ch x H x W``;
BatchNorm folds ``ch``. Every step multiplies the relevance by a class-independent gate.
"""

from __future__ import annotations

import torch

from .functions import max_unpool_overwrite, overwrite_winners


def stabilize(z: torch.Tensor, e: float) -> torch.Tensor:
    """z + e * sign(z), with sign(0) = +1."""
    # The sign term is a constant for autograd: adding it keeps the backward a pass-through.
    sign = (z.detach() >= 0).to(z.dtype) * (2 * e) - e
    return z + sign


def _channels(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def gate(act, pre, scale, shift, e):
    """act * scale / stab(pre * scale + shift); without a fold, act / stab(pre)."""
    if scale is None:
        return act / stabilize(pre, e)
    return act * _channels(scale) / stabilize(pre * _channels(scale) + _channels(shift), e)


def gated_product(rel, act, pre, scale, shift, e):
    """Epsilon step: rel (one per class) times the gate."""
    return rel * gate(act, pre, scale, shift, e).unsqueeze(1)


def gated_accumulate_(out, rel, act, pre, scale, shift, e):
    """out += gated_product(...), in place (no autograd)."""
    return out.addcmul_(rel, gate(act, pre, scale, shift, e).unsqueeze(1))


def pool_spread(rel, act, pre, e):
    """2x2 average-pool spreading of rel (B x C x ch x h x w) times act / (4 stab(pre)).

    Rows and columns the pool dropped (odd sizes) get none.
    """
    batch, classes, channels, h, w = rel.shape
    height, width = act.shape[-2:]
    factor = act / (4.0 * stabilize(pre, e))
    core = factor[:, :, :2 * h, :2 * w].reshape(batch, 1, channels, h, 2, w, 2)
    spread = (rel[:, :, :, :, None, :, None] * core).reshape(batch, classes, channels, 2 * h, 2 * w)
    if (height, width) != (2 * h, 2 * w):
        spread = torch.nn.functional.pad(spread, (0, width - 2 * w, 0, height - 2 * h))
    return spread


def max_unpool_gated(rel, indices, act, z, e, kernel_size, stride, padding):
    """Un-pools rel with the original's overwrite rule, times act / stab(z)."""
    input_hw = tuple(act.shape[-2:])
    unpooled = max_unpool_overwrite(rel, indices, overwrite_winners(indices, input_hw), input_hw)
    return unpooled * (act / stabilize(z, e)).unsqueeze(1)


def input_rule(back, x, coefficients=()):
    """x * back[:, :, :CIN] - sum_k coefficients[k] * back[:, :, (k+1) CIN:(k+2) CIN]."""
    channels = x.shape[1]
    heat = back[:, :, :channels] * x.unsqueeze(1)
    for k, coefficient in enumerate(coefficients, start=1):
        heat = heat - coefficient * back[:, :, k * channels:(k + 1) * channels]
    return heat
