"""The Triton kernels as ``torch.library`` operators; same signatures as ``torch_ops``.

Each step is an op ``isnet_fast::<name>`` (``torch.library.triton_op``), each differentiable
one with a backward op ``isnet_fast::<name>_backward`` that ``register_autograd`` ties to it;
the classes named after the autograd Functions they replaced keep ``.apply`` working. The ops
launch through ``torch.library.wrap_triton``, so torch.compile on CUDA traces into them and
inductor gets the kernels themselves; in eager they launch the kernels directly. Under Triton's
CPU interpreter they are opaque to torch.compile, as a ``custom_op`` is (``_keep_opaque``).
``tests/test_triton_library_ops.py`` runs ``torch.library.opcheck`` on each.

Forward saves only the tensors backward reads; gates and denominators are recomputed there.
The kernels take any strides whose spatial dims flatten into one (both NCHW and channels_last
do); their outputs and gradients come back in the activations' layout.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensorMode

from isnet_fast.kernels.gated_product import gated_product_backward, gated_product_forward
from isnet_fast.kernels.input_rule import input_rule_backward, input_rule_forward
from isnet_fast.kernels.max_unpool import max_unpool_backward, max_unpool_forward
from isnet_fast.kernels.max_unpool_sum import max_unpool_sum_backward, max_unpool_sum_forward
from isnet_fast.kernels.pool_spread import pool_spread_backward, pool_spread_forward
from isnet_fast.kernels.residual_split import (residual_shortcut_add_backward, residual_shortcut_add_forward,
                                            residual_split_backward, residual_split_forward)


def _spatial_view(t):
    """The kernels flatten H and W; an expanded or sliced tensor must allow that."""
    height, width = t.shape[-2:]
    return t if height <= 1 or t.stride(-2) == width * t.stride(-1) else t.contiguous()


# The kernels were built at their import just above under this same switch (TRITON_INTERPRET=1):
# then they are Python functions run on host memory, which no tracer can record.
_INTERPRETED = triton.knobs.runtime.interpret


class _TracedLaunch:
    """The launchers' ``wrap_triton`` inside the ops: ``_TracedLaunch(kernel)[grid](*args)``
    launches through ``torch.library.wrap_triton`` (a graph node while traced, the kernel itself
    in eager, where ``triton_op`` turns the wrapping off), with two exceptions below."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            traced = any(is_fake(t) for t in tensors)
            on_meta = any(t.device.type == "meta" for t in tensors)
            if _INTERPRETED and (traced or on_meta):
                return None  # nothing to run on; the launcher's allocations give the outputs' metadata
            if on_meta and not traced:
                # As before the ops existed: bench/compile_table.py records this call (JITFunction.run)
                # on the meta device, where wrap_triton's operator would drop it as a fake launch.
                return self.kernel[grid](*args, **kwargs)
            return torch.library.wrap_triton(self.kernel)[grid](*args, **kwargs)
        return launch


def _keep_opaque(mode, op, types, args, kwargs):
    """Functionalizes an op as a whole, as a ``custom_op`` is. triton_op's own rule traces the
    body instead, which loses interpreted launches (``_TracedLaunch`` skips them on fake tensors):
    the graph would keep the outputs' allocations and nothing that fills them."""
    return mode.__torch_dispatch__(op, types, args, kwargs)


def _registered(op):
    """A ``triton_op``, made opaque to torch.compile under Triton's interpreter (see ``_keep_opaque``)."""
    if _INTERPRETED:
        op.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
    return op


@_registered
@torch.library.triton_op("isnet_fast::gated_product", mutates_args=())
def _gated_product(rel: torch.Tensor, act: torch.Tensor, pre: torch.Tensor, scale: Optional[torch.Tensor],
                   shift: Optional[torch.Tensor], e: float, act_is_relu: bool = False) -> torch.Tensor:
    return gated_product_forward(_spatial_view(rel), _spatial_view(act), _spatial_view(pre), scale, shift, e,
                                 act_is_relu=act_is_relu, wrap_triton=_TracedLaunch)


@_registered
@torch.library.triton_op("isnet_fast::gated_product_backward", mutates_args=())
def _gated_product_backward(grad_out: torch.Tensor, rel: torch.Tensor, act: torch.Tensor, pre: torch.Tensor,
                            scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                            e: float) -> list[torch.Tensor]:
    """[grad_rel, grad_act, grad_pre], then grad_scale and grad_shift with a fold (a schema has no
    optional outputs)."""
    grads = gated_product_backward(_spatial_view(grad_out), _spatial_view(rel), _spatial_view(act),
                                   _spatial_view(pre), scale, shift, e, wrap_triton=_TracedLaunch)
    return [g for g in grads if g is not None]


def _setup_gated_product(ctx, inputs, output):
    rel, act, pre, scale, shift, e, act_is_relu = inputs
    if act_is_relu:
        raise RuntimeError("isnet_fast::gated_product with act_is_relu=True has no gradient (its gate does not "
                           "read pre); pass act_is_relu=False where autograd records")
    ctx.save_for_backward(rel, act, pre, scale, shift)
    ctx.e = e


def _gated_product_grads(ctx, grad_out):
    rel, act, pre, scale, shift = ctx.saved_tensors
    grad_rel, grad_act, grad_pre, *fold = _gated_product_backward(grad_out, rel, act, pre, scale, shift, ctx.e)
    grad_scale, grad_shift = fold or (None, None)
    return grad_rel, grad_act, grad_pre, grad_scale, grad_shift, None, None


_gated_product.register_autograd(_gated_product_grads, setup_context=_setup_gated_product)


@_registered
@torch.library.triton_op("isnet_fast::gated_accumulate_", mutates_args={"out"})
def _gated_accumulate_(out: torch.Tensor, rel: torch.Tensor, act: torch.Tensor, pre: torch.Tensor,
                       scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], e: float,
                       act_is_relu: bool = False) -> None:
    """out += gated_product(...), in place; no autograd (the pass uses it without)."""
    gated_product_forward(_spatial_view(rel), _spatial_view(act), _spatial_view(pre), scale, shift, e, out=out,
                          act_is_relu=act_is_relu, wrap_triton=_TracedLaunch)


@_registered
@torch.library.triton_op("isnet_fast::pool_spread", mutates_args=())
def _pool_spread(rel: torch.Tensor, act: torch.Tensor, pre: torch.Tensor, e: float,
                 act_is_relu: bool = False) -> torch.Tensor:
    return pool_spread_forward(rel, _spatial_view(act), _spatial_view(pre), e, act_is_relu=act_is_relu,
                               wrap_triton=_TracedLaunch)


@_registered
@torch.library.triton_op("isnet_fast::pool_spread_backward", mutates_args=())
def _pool_spread_backward(grad_out: torch.Tensor, rel: torch.Tensor, act: torch.Tensor, pre: torch.Tensor,
                          e: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pool_spread_backward(grad_out, rel, _spatial_view(act), _spatial_view(pre), e, wrap_triton=_TracedLaunch)


def _setup_pool_spread(ctx, inputs, output):
    rel, act, pre, e, act_is_relu = inputs
    if act_is_relu:
        raise RuntimeError("isnet_fast::pool_spread with act_is_relu=True has no gradient (its gate does not "
                           "read pre); pass act_is_relu=False where autograd records")
    ctx.save_for_backward(rel, act, pre)
    ctx.e = e


def _pool_spread_grads(ctx, grad_out):
    rel, act, pre = ctx.saved_tensors
    return (*_pool_spread_backward(grad_out, rel, act, pre, ctx.e), None, None)


_pool_spread.register_autograd(_pool_spread_grads, setup_context=_setup_pool_spread)


@_registered
@torch.library.triton_op("isnet_fast::max_unpool_gated", mutates_args=())
def _max_unpool_gated(rel: torch.Tensor, indices: torch.Tensor, act: torch.Tensor, z: torch.Tensor, e: float,
                      kernel_size: int, stride: int, padding: int) -> torch.Tensor:
    return max_unpool_forward(rel, indices, _spatial_view(act), _spatial_view(z), e, kernel_size, stride, padding,
                              wrap_triton=_TracedLaunch)


@_registered
@torch.library.triton_op("isnet_fast::max_unpool_gated_backward", mutates_args=())
def _max_unpool_gated_backward(grad_out: torch.Tensor, rel: torch.Tensor, indices: torch.Tensor, act: torch.Tensor,
                               z: torch.Tensor, e: float, kernel_size: int, stride: int,
                               padding: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return max_unpool_backward(_spatial_view(grad_out), rel, indices, _spatial_view(act), _spatial_view(z), e,
                               kernel_size, stride, padding, wrap_triton=_TracedLaunch)


def _setup_max_unpool_gated(ctx, inputs, output):
    rel, indices, act, z, *ctx.config = inputs
    ctx.save_for_backward(rel, indices, act, z)


def _max_unpool_gated_grads(ctx, grad_out):
    rel, indices, act, z = ctx.saved_tensors
    grad_rel, grad_act, grad_z = _max_unpool_gated_backward(grad_out, rel, indices, act, z, *ctx.config)
    return grad_rel, None, grad_act, grad_z, None, None, None, None


_max_unpool_gated.register_autograd(_max_unpool_gated_grads, setup_context=_setup_max_unpool_gated)


@_registered
@torch.library.triton_op("isnet_fast::input_rule", mutates_args=())
def _input_rule(back: torch.Tensor, x: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    return input_rule_forward(_spatial_view(back), _spatial_view(x), coefficients, wrap_triton=_TracedLaunch)


@_registered
@torch.library.triton_op("isnet_fast::input_rule_backward", mutates_args=())
def _input_rule_backward(grad_out: torch.Tensor, back: torch.Tensor, x: torch.Tensor,
                         coefficients: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return input_rule_backward(_spatial_view(grad_out), _spatial_view(back), _spatial_view(x), coefficients,
                               wrap_triton=_TracedLaunch)


def _setup_input_rule(ctx, inputs, output):
    back, x, ctx.coefficients = inputs
    ctx.save_for_backward(back, x)


def _input_rule_grads(ctx, grad_out):
    back, x = ctx.saved_tensors
    grad_back, grad_x = _input_rule_backward(grad_out, back, x, ctx.coefficients)
    return grad_back, grad_x, None


_input_rule.register_autograd(_input_rule_grads, setup_context=_setup_input_rule)


class _AsFunction:
    """A registered op under the calling convention of the autograd Function it replaced
    (``GatedProduct.apply(rel, act, pre, scale, shift, e)``), for that Function's callers."""

    def __init__(self, op):
        self.apply = op


GatedProduct = _AsFunction(_gated_product)
PoolSpread = _AsFunction(_pool_spread)
MaxUnpoolGated = _AsFunction(_max_unpool_gated)
InputRule = _AsFunction(_input_rule)


def _records_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gated_product(rel, act, pre, scale, shift, e, act_is_relu=False):
    """As ``torch_ops.gated_product``. With ``act_is_relu`` and no autograd the kernel computes the
    gate from ``act`` alone and does not read ``pre`` (a quarter less traffic with one map)."""
    act_is_relu = bool(act_is_relu) and not _records_graph(rel, act, pre, scale, shift)
    return _gated_product(rel, act, pre, scale, shift, float(e), act_is_relu)


def gated_accumulate_(out, rel, act, pre, scale, shift, e, act_is_relu=False):
    """out += gated_product(...), in place (no autograd): the dense concatenation split."""
    _gated_accumulate_(out, rel, act, pre, scale, shift, float(e), bool(act_is_relu))
    return out


def pool_spread(rel, act, pre, e, act_is_relu=False):
    act_is_relu = bool(act_is_relu) and not _records_graph(rel, act, pre)
    return _pool_spread(rel, act, pre, float(e), act_is_relu)


def max_unpool_gated(rel, indices, act, z, e, kernel_size, stride, padding, overwrite=True):
    """As ``torch_ops.max_unpool_gated``: the original's overwrite rule, or (``overwrite=False``)
    summing the pooled positions that chose a pixel, both by gathering (no atomics)."""
    if not overwrite:
        return MaxUnpoolSumGated.apply(rel, indices, act, z, float(e), kernel_size, stride, padding)
    return MaxUnpoolGated.apply(rel, indices, act, z, float(e), kernel_size, stride, padding)


def input_rule(back, x, coefficients=()):
    return _input_rule(back, x, [float(k) for k in coefficients])


# ---------------------------------------------------------------------------------------------
# Max-pool un-pooling as the LRP rules read (``IsDenseFast(reference_quirks=False)``)
# ---------------------------------------------------------------------------------------------

class MaxUnpoolSumGated(torch.autograd.Function):
    """Summing un-pool times act / stab(z) (``kernels/max_unpool_sum.py``); its backward is the
    true gradient (the forward is linear in rel and smooth in act, z away from z = 0)."""

    @staticmethod
    def forward(ctx, rel, indices, act, z, e, kernel_size, stride, padding):
        act, z = _spatial_view(act), _spatial_view(z)
        ctx.save_for_backward(rel, indices, act, z)
        ctx.config = (e, kernel_size, stride, padding)
        return max_unpool_sum_forward(rel, indices, act, z, e, kernel_size, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        rel, indices, act, z = ctx.saved_tensors
        grad_rel, grad_act, grad_z = max_unpool_sum_backward(_spatial_view(grad_out), rel, indices, act, z,
                                                             *ctx.config)
        return grad_rel, None, grad_act, grad_z, None, None, None, None


# ---------------------------------------------------------------------------------------------
# The ResNet's residual sum (``kernels/residual_split.py``, ``isnet_fast.engine.resnet.relevance``)
# ---------------------------------------------------------------------------------------------

@_registered
@torch.library.triton_op("isnet_fast::residual_split_gated", mutates_args=())
def _residual_split_gated(rel: torch.Tensor, out: torch.Tensor, total: torch.Tensor, part: torch.Tensor,
                          pre: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, e: float,
                          out_is_relu: bool = False, part_is_fold: bool = False) -> torch.Tensor:
    return residual_split_forward(*map(_spatial_view, (rel, out, total, part, pre)), scale, shift, e,
                                  out_is_relu=out_is_relu, part_is_fold=part_is_fold, wrap_triton=_TracedLaunch)


@_registered
@torch.library.triton_op("isnet_fast::residual_split_gated_backward", mutates_args=())
def _residual_split_gated_backward(
        grad_result: torch.Tensor, rel: torch.Tensor, out: torch.Tensor, total: torch.Tensor, part: torch.Tensor,
        pre: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, e: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for rel, out, total, part, pre, scale, shift."""
    return residual_split_backward(*map(_spatial_view, (grad_result, rel, out, total, part, pre)), scale, shift, e,
                                   wrap_triton=_TracedLaunch)


def _setup_residual_split_gated(ctx, inputs, output):
    rel, out, total, part, pre, scale, shift, e, out_is_relu, part_is_fold = inputs
    if out_is_relu or part_is_fold:
        raise RuntimeError("isnet_fast::residual_split_gated with out_is_relu or part_is_fold has no gradient (its "
                           "gate skips total or pre); pass both False where autograd records")
    ctx.save_for_backward(rel, out, total, part, pre, scale, shift)
    ctx.e = e


def _residual_split_gated_grads(ctx, grad_result):
    return (*_residual_split_gated_backward(grad_result, *ctx.saved_tensors, ctx.e), None, None, None)


_residual_split_gated.register_autograd(_residual_split_gated_grads, setup_context=_setup_residual_split_gated)


@_registered
@torch.library.triton_op("isnet_fast::residual_shortcut_add", mutates_args=())
def _residual_shortcut_add(back: torch.Tensor, rel: torch.Tensor, out: torch.Tensor, total: torch.Tensor, e: float,
                           out_is_relu: bool = False) -> torch.Tensor:
    return residual_shortcut_add_forward(*map(_spatial_view, (back, rel, out, total)), e, out_is_relu=out_is_relu,
                                         wrap_triton=_TracedLaunch)


@_registered
@torch.library.triton_op("isnet_fast::residual_shortcut_add_backward", mutates_args=())
def _residual_shortcut_add_backward(grad_result: torch.Tensor, rel: torch.Tensor, out: torch.Tensor,
                                    total: torch.Tensor, e: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for rel, out, total (back's is grad_result itself)."""
    return residual_shortcut_add_backward(*map(_spatial_view, (grad_result, rel, out, total)), e,
                                          wrap_triton=_TracedLaunch)


def _setup_residual_shortcut_add(ctx, inputs, output):
    back, rel, out, total, e, out_is_relu = inputs
    if out_is_relu:
        raise RuntimeError("isnet_fast::residual_shortcut_add with out_is_relu=True has no gradient (its gate "
                           "skips total); pass out_is_relu=False where autograd records")
    ctx.save_for_backward(rel, out, total)
    ctx.e = e


def _residual_shortcut_add_grads(ctx, grad_result):
    grad_rel, grad_out, grad_total = _residual_shortcut_add_backward(grad_result, *ctx.saved_tensors, ctx.e)
    return grad_result, grad_rel, grad_out, grad_total, None, None


_residual_shortcut_add.register_autograd(_residual_shortcut_add_grads, setup_context=_setup_residual_shortcut_add)


def residual_split_gated(rel, out, total, part, pre, scale, shift, e, out_is_relu=False, part_is_fold=False):
    """As ``torch_ops.residual_split_gated``. Without autograd the hints skip reading ``total``
    (``out_is_relu``) and ``pre`` and the shift (``part_is_fold``); with it the full formula runs."""
    recording = _records_graph(rel, out, total, part, pre, scale, shift)
    return _residual_split_gated(rel, out, total, part, pre, scale, shift, float(e),
                                 bool(out_is_relu) and not recording, bool(part_is_fold) and not recording)


def residual_shortcut_add(back, rel, out, total, e, out_is_relu=False):
    """As ``torch_ops.residual_shortcut_add``; ``out_is_relu`` as in ``residual_split_gated``."""
    recording = _records_graph(back, rel, out, total)
    return _residual_shortcut_add(back, rel, out, total, float(e), bool(out_is_relu) and not recording)
