"""Under torch.autocast the pass runs: convolutions in the low precision, the stabilised
divisions, the output layer and the batch statistics in float32, the heatmaps in float32.

The bf16 heatmaps are judged flash-attention style: their error against float64 must stay
within a small multiple of the error torch's own autograd makes in the same autocast, for the
input gradient of the same network (the floor of a heatmap)."""

import pytest
import torch

from helpers import rel_err
from isnet_fast import DenseNet, IsDenseFast

BF16_ERROR_FACTOR = 1.5  # ours may be at most this much worse than autograd's own bf16 input gradient


def small_net():
    torch.manual_seed(0)
    return DenseNet(growth_rate=8, block_config=(3, 4, 5, 3), num_init_features=16, bn_size=2, num_classes=5)


def l2_err(ours, ref):
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).norm() / ref.norm()).item()


def autograd_input_gradient(net, x, autocast):
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = net(x)
    return torch.autograd.grad(y[:, 0].sum(), x)[0]


@pytest.mark.parametrize("explain, selective", [("all", False), ("lowest", True), ("top", False)],
                         ids=["original", "selective", "top"])
def test_bf16_autocast_heatmaps_within_autograds_own_bf16_error(explain, selective):
    net = small_net().eval()
    x = torch.rand(2, 3, 64, 64)
    torch_error = l2_err(autograd_input_gradient(net, x, True), autograd_input_gradient(net.double(), x.double(), False))
    net.float()
    model = IsDenseFast(net, explain=explain, selective=selective).eval()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, R = model(x)
        _, exact = IsDenseFast(net.double(), explain=explain, selective=selective).eval()(x.double())
    net.float()
    assert y.dtype == torch.bfloat16  # the network ran in the low precision
    assert R.dtype == torch.float32  # the heatmaps did not
    assert torch.isfinite(R).all()
    assert 1e-4 < l2_err(R, exact) <= BF16_ERROR_FACTOR * torch_error  # low precision, yet no worse than torch's own


def test_autocast_output_layer_runs_in_float32(monkeypatch):
    # The selective quantity's exponentials would lose most digits in bf16.
    import isnet_fast.model as model_module
    seen = []
    real = model_module.classifier_input_relevance

    def spy(linear, a, y, *args, **kwargs):
        result = real(linear, a, y, *args, **kwargs)
        seen.append((y.dtype, result.dtype))
        return result
    monkeypatch.setattr(model_module, "classifier_input_relevance", spy)
    model = IsDenseFast(small_net(), selective=True, explain="lowest").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.rand(1, 3, 64, 64))
    assert seen == [(torch.bfloat16, torch.float32)]


def test_autocast_train_step_backpropagates():
    model = IsDenseFast(small_net(), selective=True, explain="lowest").train()
    x = torch.rand(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, R = model(x)
        loss = y.float().logsumexp(1).mean() + R.abs().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad.dtype == p.dtype for p in model.parameters())  # float32 parameters, float32 gradients


def test_batch_statistics_in_float32_under_autocast():
    from isnet_fast.engine.rules import batch_statistics
    torch.manual_seed(0)
    features = (torch.randn(4, 6, 9, 9) * 3 + 100).to(torch.bfloat16)  # a mean that bf16 rounds coarsely
    mean, var = batch_statistics(features)
    exact_mean = features.double().mean(dim=(0, 2, 3))
    exact_var = features.double().var(dim=(0, 2, 3), unbiased=True)
    assert mean.dtype == var.dtype == torch.float32
    assert rel_err(mean, exact_mean) < 1e-6 and rel_err(var, exact_var) < 1e-5


def test_model_converted_to_bf16_runs_within_autograds_own_bf16_error():
    net = small_net().eval()
    x = torch.rand(2, 3, 64, 64)
    exact_grad = autograd_input_gradient(net.double(), x.double(), False)
    x16 = x.to(torch.bfloat16).requires_grad_()
    y16 = net.to(torch.bfloat16)(x16)
    torch_error = l2_err(torch.autograd.grad(y16[:, 0].float().sum(), x16)[0], exact_grad)
    model = IsDenseFast(net, selective=True, explain="lowest").eval()  # the network is bf16 now
    with torch.no_grad():
        y, R = model(x.to(torch.bfloat16))
        _, exact = IsDenseFast(net.double(), selective=True, explain="lowest").eval()(x.double())
    assert y.dtype == R.dtype == torch.bfloat16
    assert torch.isfinite(R).all()
    assert l2_err(R, exact) <= BF16_ERROR_FACTOR * torch_error
