"""The Triton kernels' ``torch.library`` registration (``isnet_fast::<name>`` ops, ``triton_ops``).

``torch.library.opcheck`` runs on every registered op: its schema against what it does (new
outputs, the declared mutation), its autograd registration, its fake (meta) implementation
against the real outputs' shapes, strides and dtypes, and AOTAutograd with dynamic shapes
against eager, forward and backward. Inputs are tiny and oddly shaped (the interpreter is
slow), in float32 and float64, NCHW and channels_last (channels innermost, as a channels_last
pass gives them). Numbers against the torch ops are ``tests/test_kernels.py``'s.

Then torch.compile: on CUDA it traces into the ops (the graph holds the kernels, as
``triton_kernel_wrapper_functional`` nodes); under Triton's CPU interpreter the ops stay opaque
(``triton_ops._keep_opaque``: an interpreted kernel is a Python function on host memory, which
no tracer can record), so the graph holds ``isnet_fast::`` ops, called eagerly at run time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from isnet_fast.engine import triton_ops  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROOT = Path(__file__).resolve().parent.parent
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
E = 0.01
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]
LAYOUTS = [pytest.param(False, id="nchw"), pytest.param(True, id="channels_last")]
# every op triton_ops registers, with the kernels its body launches
KERNELS_OF_OPS = {
    "isnet_fast::gated_product": ["_gated_product_fwd_kernel"],
    "isnet_fast::gated_product_backward": ["_gated_product_bwd_kernel"],
    "isnet_fast::gated_accumulate_": ["_gated_product_fwd_kernel"],
    "isnet_fast::pool_spread": ["_pool_spread_fwd_kernel"],
    "isnet_fast::pool_spread_backward": ["_pool_spread_bwd_kernel"],
    "isnet_fast::max_unpool_gated": ["_max_unpool_fwd_kernel"],
    "isnet_fast::max_unpool_gated_backward": ["_max_unpool_bwd_kernel"],
    "isnet_fast::input_rule": ["_input_rule_fwd_kernel"],
    "isnet_fast::input_rule_backward": ["_input_rule_bwd_kernel"],
    # opcheck cases of these four: tests/test_residual_kernels.py
    "isnet_fast::residual_split_gated": ["_residual_split_fwd_kernel"],
    "isnet_fast::residual_split_gated_backward": ["_residual_split_bwd_kernel"],
    "isnet_fast::residual_shortcut_add": ["_residual_shortcut_add_fwd_kernel"],
    "isnet_fast::residual_shortcut_add_backward": ["_residual_shortcut_add_bwd_kernel"],
}
INTERPRETED = triton_ops._INTERPRETED


def tensor(g, *shape, dtype, channels_last=False, grad=False, nonzero=False):
    """Random ``... x ch x H x W`` on DEVICE; with ``channels_last`` stored channels innermost;
    ``nonzero``: bounded away from 0 (denominators)."""
    storage = (*shape[:-3], shape[-2], shape[-1], shape[-3]) if channels_last else shape
    t = torch.randn(*storage, generator=g, dtype=torch.float64)
    if nonzero:
        t = torch.where(t < 0, t - 0.5, t + 0.5)
    t = t.to(DEVICE, dtype)
    t = t.movedim(-1, -3) if channels_last else t
    return t.requires_grad_(grad)


def fold(g, channels, dtype, grad=False):
    scale = (0.5 + torch.rand(channels, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    shift = (0.05 * torch.randn(channels, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    return scale.requires_grad_(grad), shift.requires_grad_(grad)


def pool_indices(g, shape, geometry, channels_last):
    """max_pool2d's indices for a random input of ``shape`` (B x CH x H x W)."""
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return F.max_pool2d(x, *geometry, return_indices=True)[1].to(DEVICE)


def opcheck(op, args):
    return torch.library.opcheck(op, args, raise_exception=False)


def assert_passes(results):
    failed = {name: repr(result) for name, result in results.items() if result != "SUCCESS"}
    assert set(results) == set(OPCHECK_TESTS) and not failed, failed


# ---------------------------------------------------------------------------------------------
# Every registered op under opcheck
# ---------------------------------------------------------------------------------------------

def test_every_registered_op_is_checked_here():
    """A new ``isnet_fast::`` op needs opcheck cases (below, or where the table says) and its kernels in the table."""
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("isnet_fast::")}
    assert registered == set(KERNELS_OF_OPS)


# 2 images, 2 maps, 3 channels, 5 x 3 pixels: no size a power of two, odd planes
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_fold", [True, False], ids=["fold", "nofold"])
def test_gated_product(with_fold, dtype, channels_last):
    g = torch.Generator().manual_seed(1)
    rel = tensor(g, 2, 2, 3, 5, 3, dtype=dtype, channels_last=channels_last, grad=True)
    act = tensor(g, 2, 3, 5, 3, dtype=dtype, channels_last=channels_last, grad=True)
    pre = tensor(g, 2, 3, 5, 3, dtype=dtype, channels_last=channels_last, grad=True, nonzero=True)
    scale, shift = fold(g, 3, dtype, grad=True) if with_fold else (None, None)
    assert_passes(opcheck(triton_ops._gated_product, (rel, act, pre, scale, shift, E)))


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_product_act_is_relu(dtype, channels_last):
    """The gate from act alone (no autograd): only without inputs that require grad."""
    g = torch.Generator().manual_seed(2)
    pre = tensor(g, 1, 3, 3, 5, dtype=dtype, channels_last=channels_last)
    rel = tensor(g, 1, 2, 3, 3, 5, dtype=dtype, channels_last=channels_last)
    scale, shift = fold(g, 3, dtype)
    act = torch.relu(pre * scale[:, None, None] + shift[:, None, None])
    assert_passes(opcheck(triton_ops._gated_product, (rel, act, pre, scale, shift, E, True)))


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_fold", [True, False], ids=["fold", "nofold"])
def test_gated_product_backward(with_fold, dtype, channels_last):
    g = torch.Generator().manual_seed(3)
    grad_out = tensor(g, 2, 2, 3, 5, 3, dtype=dtype, channels_last=channels_last)
    rel = tensor(g, 2, 2, 3, 5, 3, dtype=dtype, channels_last=channels_last)
    act = tensor(g, 2, 3, 5, 3, dtype=dtype, channels_last=channels_last)
    pre = tensor(g, 2, 3, 5, 3, dtype=dtype, channels_last=channels_last, nonzero=True)
    scale, shift = fold(g, 3, dtype) if with_fold else (None, None)
    assert_passes(opcheck(triton_ops._gated_product_backward, (grad_out, rel, act, pre, scale, shift, E)))


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act_is_relu", [False, True], ids=["gate", "relu_gate"])
def test_gated_accumulate(act_is_relu, dtype, channels_last):
    """Into a channel slice of a wider tensor, as the dense blocks' concatenation split does:
    opcheck's schema test sees that ``out`` (and nothing else) is written."""
    g = torch.Generator().manual_seed(4)
    total = tensor(g, 2, 2, 5, 5, 3, dtype=dtype, channels_last=channels_last)
    rel = tensor(g, 2, 2, 3, 5, 3, dtype=dtype, channels_last=channels_last)
    act = tensor(g, 2, 3, 5, 3, dtype=dtype, channels_last=channels_last).relu()
    pre = tensor(g, 2, 3, 5, 3, dtype=dtype, channels_last=channels_last, nonzero=True)
    scale, shift = fold(g, 3, dtype)
    assert_passes(opcheck(triton_ops._gated_accumulate_,
                          (total[:, :, 1:4], rel, act, pre, scale, shift, E, act_is_relu)))


# 5 x 3 pixels pooled to 2 x 1: the last row and column are in no window
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_spread(dtype, channels_last):
    g = torch.Generator().manual_seed(5)
    rel = tensor(g, 1, 2, 3, 2, 1, dtype=dtype, channels_last=channels_last, grad=True)
    act = tensor(g, 1, 3, 5, 3, dtype=dtype, channels_last=channels_last, grad=True)
    pre = tensor(g, 1, 3, 5, 3, dtype=dtype, channels_last=channels_last, grad=True, nonzero=True)
    assert_passes(opcheck(triton_ops._pool_spread, (rel, act, pre, E)))


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_spread_act_is_relu(dtype, channels_last):
    g = torch.Generator().manual_seed(6)
    rel = tensor(g, 1, 2, 3, 2, 1, dtype=dtype, channels_last=channels_last)
    pre = tensor(g, 1, 3, 5, 3, dtype=dtype, channels_last=channels_last)
    assert_passes(opcheck(triton_ops._pool_spread, (rel, pre.relu(), pre, E, True)))


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_spread_backward(dtype, channels_last):
    g = torch.Generator().manual_seed(7)
    grad_out = tensor(g, 1, 2, 3, 5, 3, dtype=dtype, channels_last=channels_last)
    rel = tensor(g, 1, 2, 3, 2, 1, dtype=dtype, channels_last=channels_last)
    act = tensor(g, 1, 3, 5, 3, dtype=dtype, channels_last=channels_last)
    pre = tensor(g, 1, 3, 5, 3, dtype=dtype, channels_last=channels_last, nonzero=True)
    assert_passes(opcheck(triton_ops._pool_spread_backward, (grad_out, rel, act, pre, E)))


# the stem's pool, 3x3 / stride 2 / padding 1, on 5 x 6 pixels: windows share pixels
GEOMETRY = (3, 2, 1)


def unpool_inputs(g, dtype, channels_last, grad):
    indices = pool_indices(g, (1, 3, 5, 6), GEOMETRY, channels_last)
    rel = tensor(g, 1, 2, 3, 3, 3, dtype=dtype, channels_last=channels_last, grad=grad)
    act = tensor(g, 1, 3, 5, 6, dtype=dtype, channels_last=channels_last, grad=grad)
    z = tensor(g, 1, 3, 5, 6, dtype=dtype, channels_last=channels_last, grad=grad, nonzero=True)
    return rel, indices, act, z


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_unpool_gated(dtype, channels_last):
    g = torch.Generator().manual_seed(8)
    assert_passes(opcheck(triton_ops._max_unpool_gated, (*unpool_inputs(g, dtype, channels_last, True), E, *GEOMETRY)))


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_unpool_gated_backward(dtype, channels_last):
    g = torch.Generator().manual_seed(9)
    rel, indices, act, z = unpool_inputs(g, dtype, channels_last, False)
    grad_out = tensor(g, 1, 2, 3, 5, 6, dtype=dtype, channels_last=channels_last)
    assert_passes(opcheck(triton_ops._max_unpool_gated_backward, (grad_out, rel, indices, act, z, E, *GEOMETRY)))


# the z^B rule's three parts, its first only (epsilon rule), and two
COEFFICIENTS = {1: [], 2: [0.5], 3: [-0.25, 0.75]}


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", [1, 2, 3], ids=["1part", "2parts", "3parts"])
def test_input_rule(parts, dtype, channels_last):
    g = torch.Generator().manual_seed(10)
    back = tensor(g, 1, 2, 3 * parts, 3, 5, dtype=dtype, channels_last=channels_last, grad=True)
    x = tensor(g, 1, 3, 3, 5, dtype=dtype, channels_last=channels_last, grad=True)
    assert_passes(opcheck(triton_ops._input_rule, (back, x, COEFFICIENTS[parts])))


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", [1, 3], ids=["1part", "3parts"])
def test_input_rule_backward(parts, dtype, channels_last):
    g = torch.Generator().manual_seed(11)
    grad_out = tensor(g, 1, 2, 3, 3, 5, dtype=dtype, channels_last=channels_last)
    back = tensor(g, 1, 2, 3 * parts, 3, 5, dtype=dtype, channels_last=channels_last)
    x = tensor(g, 1, 3, 3, 5, dtype=dtype, channels_last=channels_last)
    assert_passes(opcheck(triton_ops._input_rule_backward, (grad_out, back, x, COEFFICIENTS[parts])))


def test_relu_gate_refuses_autograd():
    """Its gate skips pre: no gradient to give. The public functions pass it only without autograd."""
    g = torch.Generator().manual_seed(12)
    rel = tensor(g, 1, 1, 2, 3, 3, dtype=torch.float32, grad=True)
    act = tensor(g, 1, 2, 3, 3, dtype=torch.float32).relu()
    with pytest.raises(RuntimeError, match="act_is_relu=True has no gradient"):
        triton_ops._gated_product(rel, act, act, None, None, E, True)
    with pytest.raises(RuntimeError, match="act_is_relu=True has no gradient"):
        triton_ops._pool_spread(rel[..., :1, :1], act, act, E, True)
    assert triton_ops.gated_product(rel, act, act, None, None, E, act_is_relu=True).requires_grad


# ---------------------------------------------------------------------------------------------
# Tracing: torch.compile, make_fx, and the kernels torch finds for each op
# ---------------------------------------------------------------------------------------------

def relevance_step(rel, act, pre, scale, shift):
    return triton_ops.gated_product(rel, act, pre, scale, shift, E).sum(1) * 2.0


def captured_aot_graphs():
    """A torch.compile backend running AOTAutograd (functionalization, where triton_op decomposes
    or not) and keeping the forward and backward graphs' code; no inductor codegen."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm.code
            return make_boxed_func(gm.forward)
        return compiler
    return graphs, aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))


def test_compiled_fullgraph_gives_eagers_numbers_and_gradients():
    g = torch.Generator().manual_seed(13)
    inputs = [tensor(g, 2, 2, 3, 5, 3, dtype=torch.float32, grad=True),
              tensor(g, 2, 3, 5, 3, dtype=torch.float32, grad=True),
              tensor(g, 2, 3, 5, 3, dtype=torch.float32, grad=True, nonzero=True),
              *fold(g, 3, torch.float32, grad=True)]
    graphs, backend = captured_aot_graphs()
    torch._dynamo.reset()
    compiled = torch.compile(relevance_step, fullgraph=True, backend=backend)  # fullgraph: a break raises
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    expected = relevance_step(*inputs)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs)
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    if INTERPRETED:  # opaque: the ops themselves, run eagerly by the compiled graph
        assert "torch.ops.isnet_fast.gated_product.default" in graphs["forward"], graphs["forward"]
        assert "torch.ops.isnet_fast.gated_product_backward.default" in graphs["backward"], graphs["backward"]
    else:  # traced into: the kernels, which inductor would compile with the graph
        for name in ("forward", "backward"):
            assert "triton_kernel_wrapper_functional" in graphs[name], graphs[name]
            assert "isnet_fast" not in graphs[name], graphs[name]


@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
def test_make_fx_records_the_ops(tracing_mode):
    from torch.fx.experimental.proxy_tensor import make_fx

    g = torch.Generator().manual_seed(14)
    back = tensor(g, 1, 2, 6, 3, 5, dtype=torch.float32)
    x = tensor(g, 1, 3, 3, 5, dtype=torch.float32)

    def heatmap(back, x):
        return triton_ops.input_rule(back, x, [0.5])
    graph = make_fx(heatmap, tracing_mode=tracing_mode)(back, x)
    calls = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert calls == [torch.ops.isnet_fast.input_rule.default], graph.code
    torch.testing.assert_close(graph(back, x), heatmap(back, x))


def test_torch_finds_every_ops_kernels():
    """torch scans a triton_op's source for its kernels (AOTAutograd's cache key hashes their
    source, so that an edited kernel is recompiled). Interpreted kernels are not Triton's JIT
    functions, so this imports the ops without the interpreter, in a subprocess."""
    script = ("import json, torch, isnet_fast.engine.triton_ops\n"
              f"names = {sorted(KERNELS_OF_OPS)!r}\n"
              "print(json.dumps({n: sorted(k.fn.__name__ for k in torch._library.triton.get_triton_kernels_for_op(n))"
              " for n in names}))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads(result.stdout.splitlines()[-1]) == KERNELS_OF_OPS
