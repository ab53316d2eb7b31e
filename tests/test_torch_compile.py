"""torch.compile traces IsDenseFast in one graph (no break) and gives eager's numbers.

Graph breaks are counted with ``torch._dynamo.explain`` (tracing only, cheap); one inductor
compile of a small explain pass checks the numbers."""

import pytest
import torch

from helpers import rel_err
from isnet_fast import DenseNet, IsDenseFast

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def small_model(**kwargs):
    torch.manual_seed(0)
    net = DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=3)
    return IsDenseFast(net, **kwargs)


def graph_breaks(function, *args):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(function)(*args)
    return explanation.graph_count, explanation.graph_break_count, [b.reason for b in explanation.break_reasons]


@pytest.mark.parametrize("explain, selective", [("all", False), ("lowest", True), ("top", False), ("sum", False),
                                                ("random", False)],
                         ids=["original", "selective", "top", "sum", "stochastic"])
@pytest.mark.parametrize("mode", ["explain", "train-forward"])
def test_one_graph_no_break(mode, explain, selective):
    model = small_model(explain=explain, selective=selective).train(mode == "train-forward")
    x = torch.rand(2, 3, 32, 32)

    def step(images):
        if mode == "explain":
            with torch.no_grad():
                return model(images)
        y, R = model(images)
        return y.logsumexp(1).mean() + R.abs().mean()
    graphs, breaks, reasons = graph_breaks(step, x)
    assert (graphs, breaks) == (1, 0), reasons


def test_given_classes_trace_in_one_graph():
    model = small_model(selective=True).eval()
    with torch.no_grad():
        graphs, breaks, reasons = graph_breaks(model, torch.rand(2, 3, 32, 32), torch.tensor([2, 0]))
    assert (graphs, breaks) == (1, 0), reasons


def test_compiled_explain_gives_eagers_numbers():
    torch._dynamo.reset()
    model = small_model(selective=True, explain="lowest").eval()
    x = torch.rand(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        y, R = compiled(x)
        y_eager, R_eager = model(x)
    assert R.shape == (2, 1, 3, 32, 32)
    assert rel_err(y, y_eager) <= 1e-5
    assert rel_err(R, R_eager) <= 1e-4  # float32; inductor fuses and reorders the elementwise steps
