"""autograd Functions around the Triton kernels; same signatures as ``torch_ops``.

Forward saves only the tensors backward reads; gates and denominators are recomputed there.
The kernels take any strides whose spatial dims flatten into one (both NCHW and channels_last
do); their outputs and gradients come back in the activations' layout.
"""

from __future__ import annotations

import torch

from isnet_fast.kernels.gated_product import gated_product_backward, gated_product_forward
from isnet_fast.kernels.input_rule import input_rule_backward, input_rule_forward
from isnet_fast.kernels.max_unpool import max_unpool_backward, max_unpool_forward
from isnet_fast.kernels.pool_spread import pool_spread_backward, pool_spread_forward


def _spatial_view(t):
    """The kernels flatten H and W; an expanded or sliced tensor must allow that."""
    height, width = t.shape[-2:]
    return t if height <= 1 or t.stride(-2) == width * t.stride(-1) else t.contiguous()


class GatedProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rel, act, pre, scale, shift, e):
        rel, act, pre = _spatial_view(rel), _spatial_view(act), _spatial_view(pre)
        ctx.save_for_backward(rel, act, pre, scale, shift)
        ctx.e = e
        return gated_product_forward(rel, act, pre, scale, shift, e)

    @staticmethod
    def backward(ctx, grad_out):
        rel, act, pre, scale, shift = ctx.saved_tensors
        grads = gated_product_backward(_spatial_view(grad_out), rel, act, pre, scale, shift, ctx.e)
        return (*grads, None)


class PoolSpread(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rel, act, pre, e):
        act, pre = _spatial_view(act), _spatial_view(pre)
        ctx.save_for_backward(rel, act, pre)
        ctx.e = e
        return pool_spread_forward(rel, act, pre, e)

    @staticmethod
    def backward(ctx, grad_out):
        rel, act, pre = ctx.saved_tensors
        return (*pool_spread_backward(grad_out, rel, act, pre, ctx.e), None)


class MaxUnpoolGated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rel, indices, act, z, e, kernel_size, stride, padding):
        act, z = _spatial_view(act), _spatial_view(z)
        ctx.save_for_backward(rel, indices, act, z)
        ctx.config = (e, kernel_size, stride, padding)
        return max_unpool_forward(rel, indices, act, z, e, kernel_size, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        rel, indices, act, z = ctx.saved_tensors
        grad_rel, grad_act, grad_z = max_unpool_backward(_spatial_view(grad_out), rel, indices, act, z, *ctx.config)
        return grad_rel, None, grad_act, grad_z, None, None, None, None


class InputRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, back, x, coefficients):
        back, x = _spatial_view(back), _spatial_view(x)
        ctx.save_for_backward(back, x)
        ctx.coefficients = coefficients
        return input_rule_forward(back, x, coefficients)

    @staticmethod
    def backward(ctx, grad_out):
        back, x = ctx.saved_tensors
        grad_back, grad_x = input_rule_backward(_spatial_view(grad_out), back, x, ctx.coefficients)
        return grad_back, grad_x, None


def _records_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gated_product(rel, act, pre, scale, shift, e, act_is_relu=False):
    """As ``torch_ops.gated_product``. With ``act_is_relu`` and no autograd the kernel computes the
    gate from ``act`` alone and does not read ``pre`` (a quarter less traffic with one map)."""
    if act_is_relu and not _records_graph(rel, act, pre, scale, shift):
        return gated_product_forward(_spatial_view(rel), _spatial_view(act), _spatial_view(pre), scale, shift,
                                     float(e), act_is_relu=True)
    return GatedProduct.apply(rel, act, pre, scale, shift, float(e))


def gated_accumulate_(out, rel, act, pre, scale, shift, e, act_is_relu=False):
    """out += gated_product(...), in place (no autograd): the dense concatenation split."""
    return gated_product_forward(_spatial_view(rel), _spatial_view(act), _spatial_view(pre), scale, shift, float(e),
                                 out=out, act_is_relu=act_is_relu)


def pool_spread(rel, act, pre, e, act_is_relu=False):
    if act_is_relu and not _records_graph(rel, act, pre):
        return pool_spread_forward(rel, _spatial_view(act), _spatial_view(pre), float(e), act_is_relu=True)
    return PoolSpread.apply(rel, act, pre, float(e))


def max_unpool_gated(rel, indices, act, z, e, kernel_size, stride, padding):
    return MaxUnpoolGated.apply(rel, indices, act, z, float(e), kernel_size, stride, padding)


def input_rule(back, x, coefficients=()):
    return InputRule.apply(back, x, tuple(float(k) for k in coefficients))
