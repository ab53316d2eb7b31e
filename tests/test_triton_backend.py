"""IsDenseFast with ``backend="triton"``: the original's fixtures, the dispatch, and agreement
with the torch backend. Without a GPU the kernels run in Triton's interpreter (tests/conftest.py),
which takes seconds per model: float64 only, small models only."""

import copy

import pytest
import torch

pytest.importorskip("triton")

import isnet_fast.model  # noqa: E402
from helpers import load_fixture, rel_err  # noqa: E402
from isnet_fast import DenseNet, IsDenseFast, IsResNetFast, ResNet  # noqa: E402
from isnet_fast.engine import torch_ops
from test_parity import assert_matches_fixture, build_from_fixture  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# d121_topology_eval is left out: far too slow in the interpreter
FIXTURES = ["tiny_eval_zb", "tiny_eval_eps", "tiny_train_dropout", "single_class_64", "ten_classes"]


def on_device(data):
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in data.items()}


@pytest.mark.parametrize("name", FIXTURES)
def test_triton_backend_matches_reference(name):
    data = load_fixture(name)
    model = build_from_fixture(data, torch.float64, backend="triton").to(DEVICE)
    x = data["x"].to(DEVICE, torch.float64).requires_grad_()
    y, R = model(x)
    ((R * data["G_R"].to(R)).sum() + (y * data["G_y"].to(y)).sum()).backward()

    assert_matches_fixture(data, model, x, y, R, torch.float64)


@pytest.mark.parametrize("name", FIXTURES)
def test_triton_backend_no_grad_heatmaps_match_reference(name):
    data = load_fixture(name)
    model = build_from_fixture(data, torch.float64, backend="triton").to(DEVICE)
    with torch.no_grad():
        y, R = model(data["x"].to(DEVICE, torch.float64))
    assert not R.requires_grad
    assert rel_err(y, data["y"]) <= 1e-6
    assert rel_err(R, data["R"]) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

def tiny_model(backend, **kwargs):
    torch.manual_seed(0)
    net = DenseNet(growth_rate=3, block_config=(2, 2), num_init_features=5, bn_size=1, num_classes=2)
    return IsDenseFast(net, backend=backend, **kwargs).eval()


def test_auto_backend_uses_torch_ops_on_cpu(monkeypatch):
    x = torch.rand(1, 3, 31, 37)
    assert isnet_fast.model.ops_for("auto", x) is torch_ops
    assert isnet_fast.model.ops_for("torch", x) is torch_ops
    chosen = []
    real_ops_for = isnet_fast.model.ops_for

    def spy(backend, tensor):
        ops = real_ops_for(backend, tensor)
        chosen.append(ops)
        return ops
    monkeypatch.setattr(isnet_fast.model, "ops_for", spy)
    y, R = tiny_model("auto")(x)
    assert chosen == [torch_ops]
    assert R.shape == (1, 2, 3, 31, 37)


def test_triton_backend_uses_triton_ops():
    from isnet_fast.engine import triton_ops
    x = torch.rand(1, 3, 8, 8, device=DEVICE)
    assert isnet_fast.model.ops_for("triton", x) is triton_ops


def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.rand(1, 3, 31, 37)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        isnet_fast.model.ops_for("triton", x)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tiny_model("triton")(x)


@pytest.mark.parametrize("backend", ["cuda", "Triton", "", None])
def test_invalid_backend_raises(backend):
    with pytest.raises(ValueError, match="backend"):
        tiny_model(backend)


# ---------------------------------------------------------------------------------------------
# Triton and torch backends agree on an odd-sized model
# ---------------------------------------------------------------------------------------------

def run_both(zb, train, e):
    """y, R, grad_x, parameter gradients and running statistics (with grad), and y, R under
    no_grad, of the triton and the torch backend on copies of one tiny DenseNet, 31 x 37 input."""
    torch.manual_seed(0)
    net = DenseNet(growth_rate=3, block_config=(2, 2), num_init_features=5, bn_size=1, num_classes=2).double()
    with torch.no_grad():  # make the running statistics and affine parameters not trivial
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    x = torch.rand(1, 3, 31, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = {}
    for backend in ("triton", "torch"):
        device = DEVICE if backend == "triton" else torch.device("cpu")
        model = IsDenseFast(copy.deepcopy(net), e=e, Zb=zb, backend=backend).to(device).train(train)
        # The torch backend runs the network channels_last on the CPU: give the kernels the same
        # layout, so that both sum the convolutions in one order (and the kernels see strided
        # activations).
        xx = x.to(device).contiguous(memory_format=torch.channels_last).requires_grad_()
        y, R = model(xx)
        cot_y = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(device)
        cot_R = torch.randn(R.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
        ((R * cot_R).sum() + (y * cot_y).sum()).backward()
        out = {"y": y, "R": R, "grad_x": xx.grad}
        out.update({f"grad {k}": p.grad for k, p in model.DenseNet.named_parameters()})
        out.update({k: v.clone() for k, v in model.DenseNet.state_dict().items() if "running" in k})
        with torch.no_grad():
            y, R = model(x.to(device).contiguous(memory_format=torch.channels_last))
        out.update({"y no_grad": y, "R no_grad": R})
        results[backend] = {k: v.detach().cpu() for k, v in out.items()}
    return results


def assert_backends_agree(results, tol=1e-12):
    ours, theirs = results["triton"], results["torch"]
    assert set(ours) == set(theirs)
    assert theirs["R"].abs().max() > 0 and theirs["grad_x"].abs().max() > 0
    for key in theirs:
        assert rel_err(ours[key], theirs[key]) <= tol, key


@pytest.mark.parametrize("zb, train", [pytest.param(True, False, id="Zb-eval"),
                                       pytest.param(False, True, id="eps-train")])
def test_triton_and_torch_backends_agree_on_odd_sizes(zb, train):
    # e = 2**-7 is a float32 number: see test_triton_and_torch_backends_agree_with_default_epsilon
    assert_backends_agree(run_both(zb, train, e=2.0 ** -7))


def test_triton_and_torch_backends_agree_with_default_epsilon():
    assert_backends_agree(run_both(zb=True, train=False, e=1e-2))


# ---------------------------------------------------------------------------------------------
# No host syncs on CUDA
# ---------------------------------------------------------------------------------------------

def _small_wrapped(arch):
    torch.manual_seed(0)
    if arch == "densenet":
        net = DenseNet(growth_rate=3, block_config=(2, 2), num_init_features=5, bn_size=1, num_classes=3)
        return IsDenseFast(net, check_finite=False)
    net = ResNet("bottleneck", (1, 1), 3, stem_width=8, widths=(4, 6))
    return IsResNetFast(net, check_finite=False)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("arch", ["densenet", "resnet"])
def test_cuda_pass_waits_for_the_gpu_nowhere(arch, mode):
    """Forward, heatmaps and (in train mode) backward queue their work without waiting for the GPU:
    no .item(), no blocking host copy, no boolean-mask indexing. CUDA's sync debug mode "error"
    raises at any of them. The NaN check, which syncs once by design, is off."""
    model = _small_wrapped(arch).cuda().train(mode == "train")
    x = torch.rand(2, 3, 40, 44, device="cuda")

    def step():
        y, R = model(x)
        if mode == "train":
            (R.square().sum() + y.sum()).backward()
        return R

    step()  # compiles the kernels and caches their scalar tensors (one host copy each)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        R = step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert R.is_cuda and torch.isfinite(R).all()
