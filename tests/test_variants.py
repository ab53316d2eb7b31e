"""The Faster ISNet variants (one heatmap per image) against the authors' newer code's float64
outputs (tests/fixtures/fi_*, from ../shared/fixtures/faster), and their interface."""

import pytest
import torch

from helpers import load_fixture, rel_err
from isnet_fast import DenseNet, IsDenseFast
from isnet_fast.engine.output import stochastic_classes
from test_parity import TOLERANCE, assert_matches_fixture, build_from_fixture

# The faster reference un-pools in float64: an exact implementation lands near 1e-13.
FASTER_TOLERANCE = {torch.float64: dict(y=1e-9, R=1e-9, grad_x=1e-9, grad_param=1e-9, running=1e-9),
                    torch.float32: TOLERANCE[torch.float32]}


def label(data):
    return data["label"]


def replayed_draw(data):
    return data["explained"]


def lowest_class(data):
    # The reference ran this fixture with highest=True beside the label, and its selective
    # output then explains argmin(y) whatever the label says: its R is that of argmin(y) for
    # every image (image 1's label is 1, its argmin 0, and R matches class 0 to 1e-14), though
    # the fixture's "explained" repeats the label. Parity is checked for the class it explained.
    return data["y"].argmin(1)


# fixture -> (IsDenseFast settings, the classes passed to forward)
VARIANTS = {
    "fi_highest_eval": (dict(explain="top"), None),
    "fi_label_train": (dict(), label),
    "fi_stochastic_top_eval": (dict(), replayed_draw),
    "fi_stochastic_other_eval": (dict(), replayed_draw),
    "fi_selective_eval": (dict(selective=True, explain="lowest"), None),
    "fi_selective_train": (dict(selective=True, explain="lowest"), None),
    "fi_selective_d121": (dict(selective=True, explain="lowest"), None),
    "fi_selective_label_eval": (dict(selective=True), lowest_class),
    "fi_all_logits_eval": (dict(explain="sum"), None),
    "fi_selective_all_eval": (dict(selective=True, explain="all"), None),
}
SMALL = [name for name in VARIANTS if name != "fi_selective_d121"]  # for the interpreter


def run_variant(name, dtype, backend="torch", grad=True):
    data = load_fixture(name)
    settings, pick = VARIANTS[name]
    model = build_from_fixture(data, dtype, backend)
    for key, value in settings.items():
        setattr(model, key, value)
    classes = pick(data) if pick else None
    x = data["x"].to(dtype).clone().requires_grad_(grad)
    if not grad:
        with torch.no_grad():
            return data, model, x, *model(x, classes=classes)
    y, R = model(x, classes=classes)
    ((R * data["G_R"].to(dtype)).sum() + (y * data["G_y"].to(dtype)).sum()).backward()
    return data, model, x, y, R


def assert_matches(data, model, x, y, R, dtype):
    assert_matches_fixture(data, model, x, y, R, dtype, FASTER_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_faster_reference(name, dtype):
    assert_matches(*run_variant(name, dtype), dtype)


@pytest.mark.parametrize("name", ["fi_selective_eval", "fi_selective_train", "fi_all_logits_eval"])
def test_no_grad_heatmaps_match_faster_reference(name):
    data, model, x, y, R = run_variant(name, torch.float64, grad=False)
    assert not R.requires_grad
    assert rel_err(y, data["y"]) <= 1e-9
    assert rel_err(R, data["R"]) <= 1e-9


@pytest.mark.parametrize("name", SMALL)
def test_triton_backend_matches_faster_reference(name):
    pytest.importorskip("triton")
    assert_matches(*run_variant(name, torch.float64, backend="triton"), torch.float64)


def test_selective_label_fixture_labels_where_the_reference_followed_them():
    # Image 0's label is its argmin, so there the fixture is the label's map too.
    data = load_fixture("fi_selective_label_eval")
    assert data["label"][0] == data["y"][0].argmin()
    model = build_from_fixture(data, torch.float64)
    model.selective = True
    with torch.no_grad():
        _, R = model(data["x"], classes=data["label"])
    assert rel_err(R[0], data["R"][0]) <= 1e-9
    assert rel_err(R[1], data["R"][1]) > 1e-3  # image 1: the reference explained argmin(y), not the label


# ---------------------------------------------------------------------------------------------
# classes=c is map c of explain="all"; the variants' shapes
# ---------------------------------------------------------------------------------------------

def tiny_net(num_classes=4, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    net = DenseNet(growth_rate=3, block_config=(2, 3), num_init_features=5, bn_size=2, num_classes=num_classes)
    with torch.no_grad():
        net.classifier.bias.uniform_(-0.5, 0.5)  # a nonzero bias, so its gradient tells the variants apart
    return net.to(dtype)


def heatmaps_and_grads(model, x, classes=None, pick=None):
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y, R = model(x, classes=classes)
    if pick is not None:
        R = R[torch.arange(len(pick)), pick].unsqueeze(1)
    torch.manual_seed(1)
    (R * torch.randn_like(R)).sum().backward()
    grads = {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for name, p in model.DenseNet.named_parameters()}
    return R.detach(), x.grad, grads


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("selective", [False, True], ids=["logit", "selective"])
def test_classes_pick_the_map_of_explain_all(selective, mode):
    model = IsDenseFast(tiny_net(), selective=selective).train(mode == "train")
    x = torch.rand(3, 3, 23, 29, dtype=torch.float64)
    classes = torch.tensor([2, 0, 3])
    one, grad_x_one, grads_one = heatmaps_and_grads(model, x, classes=classes)
    model.explain = "all"
    picked, grad_x_all, grads_all = heatmaps_and_grads(model, x, pick=classes)
    assert one.shape == (3, 1, 3, 23, 29)
    assert rel_err(one, picked) <= 1e-12
    assert rel_err(grad_x_one, grad_x_all) <= 1e-10
    for name in grads_one:
        if name == "classifier.bias" and not selective:
            # "all" starts from y (bias with gradient), one map from the logits with the bias detached
            assert grads_one[name].abs().max() == 0 and grads_all[name].abs().max() > 0
            continue
        assert rel_err(grads_one[name], grads_all[name]) <= 1e-10, name


@pytest.mark.parametrize("explain, selective, maps", [
    ("all", False, 4), ("top", False, 1), ("lowest", False, 1), ("random", False, 1), ("sum", False, 1),
    ("all", True, 4), ("top", True, 1), ("lowest", True, 1), ("random", True, 1),
], ids=lambda v: str(v))
def test_heatmap_shapes(explain, selective, maps):
    model = IsDenseFast(tiny_net(dtype=torch.float32), explain=explain, selective=selective).eval()
    assert model.maps_per_image == maps
    with torch.no_grad():
        y, R = model(torch.rand(2, 3, 21, 21))
    assert y.shape == (2, 4)
    assert R.shape == (2, maps, 3, 21, 21)
    assert torch.isfinite(R).all()


@pytest.mark.parametrize("explain, pick", [("top", torch.argmax), ("lowest", torch.argmin)], ids=["top", "lowest"])
def test_top_and_lowest_explain_argmax_and_argmin(explain, pick):
    model = IsDenseFast(tiny_net(num_classes=5)).eval()
    x = torch.rand(4, 3, 21, 21, dtype=torch.float64)
    model.explain = explain
    with torch.no_grad():
        y, R = model(x)
        _, expected = model(x, classes=pick(y, dim=1))
    assert torch.equal(R, expected)


def test_sum_is_the_sum_of_the_single_logit_maps():
    # LRP is linear in the output relevance: the map of all logits together is the sum of the
    # one-logit maps (all from the logits with the bias detached).
    model = IsDenseFast(tiny_net(), explain="sum").eval()
    x = torch.rand(2, 3, 21, 21, dtype=torch.float64)
    with torch.no_grad():
        _, total = model(x)
        parts = sum(model(x, classes=torch.full((2,), c))[1] for c in range(4))
    assert rel_err(total, parts) <= 1e-10


def test_one_map_pass_sees_one_map_below_the_classifier(monkeypatch):
    # Cost independent of K: every relevance tensor below the output layer is B x 1 x ...
    import isnet_fast.engine.densenet.relevance as relevance_module
    seen = []
    real = relevance_module.post_block_relevance

    def spy(block, acts, factor, *args, **kwargs):
        seen.append(factor.shape[1])
        return real(block, acts, factor, *args, **kwargs)
    monkeypatch.setattr(relevance_module, "post_block_relevance", spy)
    model = IsDenseFast(tiny_net(num_classes=40), explain="top", selective=True).eval()
    with torch.no_grad():
        model(torch.rand(2, 3, 21, 21, dtype=torch.float64))
    assert seen == [1, 1]


# ---------------------------------------------------------------------------------------------
# The stochastic draw
# ---------------------------------------------------------------------------------------------

def test_stochastic_draw_coin_and_uniform_choice():
    torch.manual_seed(123)
    batch, num_classes, draws = 64, 5, 2000
    y = torch.randn(batch, num_classes)
    top = y.argmax(1)
    heads = 0
    counts = torch.zeros(num_classes)
    for _ in range(draws):
        classes = stochastic_classes(y)
        if torch.equal(classes, top):
            heads += 1
        else:
            assert not (classes == top).any(), "the 'others' side never explains the top class"
            counts += torch.bincount(classes, minlength=num_classes).float()
    # Each draw of the coin: p = 1/2; 2000 draws, a 4.5-sigma band is +-50.
    assert abs(heads - draws / 2) < 4.5 * (draws * 0.25) ** 0.5
    # Among the others, each class is drawn with probability 1 / (K - 1) per image.
    tails = draws - heads
    expected = torch.zeros(num_classes)
    for c in range(num_classes):
        expected[c] = tails * ((top != c).sum() / (num_classes - 1))
    assert ((counts - expected).abs() <= 4.5 * expected.sqrt() + 1).all()


def test_stochastic_draw_follows_the_seed_and_the_generator():
    model = IsDenseFast(tiny_net(num_classes=6), explain="random").eval()
    y = torch.randn(8, 6)
    torch.manual_seed(7)
    first = [model.explained_classes(y) for _ in range(20)]
    torch.manual_seed(7)
    again = [model.explained_classes(y) for _ in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len({tuple(c.tolist()) for c in first}) > 2  # it does draw
    model.generator = torch.Generator().manual_seed(7)
    from_generator = [model.explained_classes(y) for _ in range(20)]
    model.generator = torch.Generator().manual_seed(7)
    assert all(torch.equal(a, model.explained_classes(y)) for a in from_generator)


def test_random_heatmaps_replay_with_the_drawn_classes():
    model = IsDenseFast(tiny_net(), explain="random").eval()
    x = torch.rand(3, 3, 21, 21, dtype=torch.float64)
    with torch.no_grad():
        y = model.DenseNet(x)
        torch.manual_seed(5)
        drawn = model.explained_classes(y)
        torch.manual_seed(5)
        _, R = model(x)
        _, replayed = model(x, classes=drawn)
    assert torch.equal(R, replayed)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes, error, words", [
    (torch.tensor([0.0, 1.0]), TypeError, "integer class indices"),
    (torch.tensor([True, False]), TypeError, "integer class indices"),
    ([0, 1], TypeError, "LongTensor"),
    (torch.tensor([0, 1, 2]), ValueError, "shape (2,)"),
    (torch.tensor([[0], [1]]), ValueError, "shape (2,)"),
    (torch.tensor([0, 4]), ValueError, "[0, 4)"),
    (torch.tensor([-1, 0]), ValueError, "[0, 4)"),
], ids=["float", "bool", "list", "too-many", "2-d", "too-large", "negative"])
def test_bad_classes_raise(classes, error, words):
    model = IsDenseFast(tiny_net(dtype=torch.float32)).eval()
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        model(torch.rand(2, 3, 21, 21), classes=classes)


@pytest.mark.parametrize("kwargs, num_classes, words", [
    (dict(explain="highest"), 4, "explain must be one of"),
    (dict(explain="random"), 1, "at least two classes"),
    (dict(selective=True), 1, "at least two classes"),
    (dict(selective=True, explain="sum"), 4, "cannot explain the sum"),
    (dict(selective="yes"), 4, "True or False"),
], ids=["unknown-explain", "random-one-class", "selective-one-class", "selective-sum", "selective-not-bool"])
def test_bad_variants_raise_at_construction_and_on_the_instance(kwargs, num_classes, words):
    with pytest.raises((ValueError, TypeError), match=words):
        IsDenseFast(tiny_net(num_classes=num_classes), **kwargs)
    model = IsDenseFast(tiny_net(num_classes=num_classes))
    *valid, (key, value) = kwargs.items()
    for valid_key, valid_value in valid:
        setattr(model, valid_key, valid_value)
    before = getattr(model, key)
    with pytest.raises((ValueError, TypeError), match=words):
        setattr(model, key, value)
    assert getattr(model, key) == before  # a refused change leaves the model as it was


def test_selective_quantity_stays_finite_for_far_apart_logits():
    # exp(-Z) alone overflows float32 once a logit is 88 above the explained one (argmin's);
    # scaled as in a log-sum-exp the quantity is the same and finite.
    from isnet_fast.engine.output import classifier_input_relevance
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 4).double()
    a = torch.rand(3, 6, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.mul_(600.0)  # logits hundreds apart
    y = linear(a)
    assert (y.max(1).values - y.min(1).values).min() > 100
    lowest = y.argmin(1)
    exact = classifier_input_relevance(linear, a, y, 0.01, "lowest", True, lowest)
    ours = classifier_input_relevance(linear.float(), a.float(), y.float(), 0.01, "lowest", True, lowest)
    assert torch.isfinite(ours).all()
    assert rel_err(ours, exact) <= 1e-4
