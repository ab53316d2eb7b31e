"""The ResNet ISNet: the model's layout, IsResNetFast against the authors' float64 outputs
(tests/fixtures/rn_*, from ../shared/fixtures/resnet), against the slow per-step pass, and the
errors for models it cannot read."""

import copy

import pytest
import torch
import torch.nn as nn

from helpers import load_fixture, rel_err
from isnet_fast import IsResNetFast, ResNet, resnet18, resnet50
from isnet_fast.engine.output import classifier_input_relevance
from isnet_fast.engine.resnet.plan import build_resnet_plan
from isnet_fast.engine.resnet.reference import reference_resnet_relevance
from isnet_fast.engine.resnet.relevance import resnet_relevance, run_resnet_forward
from isnet_fast.engine import UnsupportedModelError
from test_parity import TOLERANCE

FIXTURES = ["rn_basic_original_eval", "rn_basic_selective_eval_noZb", "rn_basic_selective_label_eval",
            "rn_basic_selective_train", "rn_bottle_original_eval", "rn_bottle_original_train_noZb",
            "rn_bottle_selective_eval_noZb"]

# The fixtures' README: float64 within 1e-9 for every quantity; float32 as the original fixtures.
RESNET_TOLERANCE = {torch.float64: dict(y=1e-9, R=1e-9, grad_x=1e-9, grad_param=1e-9, running=1e-9),
                    torch.float32: TOLERANCE[torch.float32]}


def reference_explained(data):
    # The authors' LRPResNet.forward(x) takes no label, so their "selective_label" run explained
    # the Selective ISNet's default, argmin(y), whatever the label (its R matches argmin(y) to
    # 1e-14 for every image; the labels are 3, 0, 0, the argmins 1, 1, 1); the fixture's
    # "explained" repeats the label. Parity is checked for the class it explained.
    return data["y"].argmin(1)


# the fixture's variant -> (IsResNetFast settings, the classes passed to forward)
VARIANTS = {
    "original": (dict(explain="all"), None),
    "selective": (dict(selective=True, explain="lowest"), None),
    "selective_label": (dict(selective=True), reference_explained),
    "highest": (dict(explain="top"), None),
}


def net_from_config(config):
    return ResNet(config["block"], config["layers"], num_classes=config["num_classes"], stem_width=config["stem"],
                  widths=config["widths"], width_per_group=config.get("width_per_group", 64),
                  dropout=0.0 if config.get("dropout_classifier") else None)


def build_from_fixture(data, dtype, backend="torch"):
    config = data["config"]
    net = net_from_config(config)
    net.load_state_dict(data["state_dict"])
    settings, _ = VARIANTS[data["variant"]]
    model = IsResNetFast(net.to(dtype), e=config["e"], Zb=config["Zb"], backend=backend, **settings)
    return model.train(config["mode"] == "train")


def run_fixture(name, dtype, backend="torch", grad=True, device="cpu"):
    data = load_fixture(name)
    model = build_from_fixture(data, dtype, backend).to(device)
    _, pick = VARIANTS[data["variant"]]
    classes = pick(data).to(device) if pick else None
    x = data["x"].to(device, dtype).clone().requires_grad_(grad)
    if not grad:
        with torch.no_grad():
            return data, model, x, *model(x, classes=classes)
    y, R = model(x, classes=classes)
    ((R * data["G_R"].to(R)).sum() + (y * data["G_y"].to(y)).sum()).backward()
    return data, model, x, y, R


def assert_matches_resnet_fixture(data, model, x, y, R, dtype):
    tol = RESNET_TOLERANCE[dtype]
    assert R.shape == data["R"].shape
    assert rel_err(y, data["y"]) <= tol["y"]
    assert rel_err(R, data["R"]) <= tol["R"]
    assert rel_err(x.grad, data["grad_x"]) <= tol["grad_x"]
    params = dict(model.resnet.named_parameters())
    assert set(params) == set(data["grad_params"])
    for name, param in params.items():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        assert rel_err(grad, data["grad_params"][name]) <= tol["grad_param"], name
    state = model.resnet.state_dict()
    running = [key for key in data["state_dict_after"] if "running" in key]
    assert running
    for key in running:  # moved in train mode, unchanged in eval mode
        assert rel_err(state[key], data["state_dict_after"][key]) <= tol["running"], key


# ---------------------------------------------------------------------------------------------
# The model: torchvision's layout
# ---------------------------------------------------------------------------------------------

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_keys(block, layers, downsampled_stages):
    """torchvision's ResNet state-dict keys, in order, written from its known layout."""
    keys = ["conv1.weight"] + [f"bn1.{k}" for k in BN_KEYS]
    convs = 3 if block == "bottleneck" else 2
    for stage, count in enumerate(layers, start=1):
        for index in range(count):
            prefix = f"layer{stage}.{index}."
            for k in range(1, convs + 1):
                keys += [f"{prefix}conv{k}.weight"] + [f"{prefix}bn{k}.{key}" for key in BN_KEYS]
            if index == 0 and stage in downsampled_stages:
                keys += [f"{prefix}downsample.0.weight"] + [f"{prefix}downsample.1.{key}" for key in BN_KEYS]
    return keys + ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("factory, block, layers, downsampled, fc_in", [
    (resnet18, "basic", (2, 2, 2, 2), (2, 3, 4), 512),
    (resnet50, "bottleneck", (3, 4, 6, 3), (1, 2, 3, 4), 2048),
], ids=["resnet18", "resnet50"])
def test_state_dict_keys_are_torchvisions(factory, block, layers, downsampled, fc_in):
    state = factory(num_classes=10).state_dict()
    assert list(state) == torchvision_keys(block, layers, downsampled)
    assert state["fc.weight"].shape == (10, fc_in)
    assert state["layer2.0.downsample.0.weight"].shape == (128 * (4 if block == "bottleneck" else 1),
                                                            64 * (4 if block == "bottleneck" else 1), 1, 1)


@pytest.mark.parametrize("factory, count", [(resnet18, 11_689_512), (resnet50, 25_557_032)],
                         ids=["resnet18", "resnet50"])
def test_parameter_count_is_torchvisions(factory, count):
    assert sum(p.numel() for p in factory().parameters()) == count


def test_dropout_puts_the_linear_at_fc_1_and_relus_are_not_in_place():
    net = ResNet("basic", (1, 1), num_classes=3, stem_width=4, widths=(4, 8), dropout=0.2)
    assert isinstance(net.fc[0], nn.Dropout) and net.fc[0].p == 0.2
    assert {"fc.1.weight", "fc.1.bias"} <= set(net.state_dict())
    relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)


def test_torchvision_initialisation():
    torch.manual_seed(0)
    net = ResNet("bottleneck", (1, 1), num_classes=3, stem_width=16, widths=(16, 32))
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in bns)
    conv = net.layer2[0].conv2  # kaiming normal, fan_out, relu gain: std sqrt(2 / (32 * 9))
    assert abs(conv.weight.std().item() / (2 / (32 * 9)) ** 0.5 - 1) < 0.1


def test_basic_block_refuses_another_group_width():
    with pytest.raises(ValueError, match="width_per_group=64"):
        ResNet("basic", (1,), widths=(4,), stem_width=4, width_per_group=32)


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_weights_load_and_the_logits_match(name):
    data = load_fixture(name)
    net = net_from_config(data["config"])
    net.load_state_dict(data["state_dict"])
    net = net.double().train(data["config"]["mode"] == "train")
    with torch.no_grad():
        assert rel_err(net(data["x"]), data["y"]) <= 1e-12


# ---------------------------------------------------------------------------------------------
# The authors' outputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", FIXTURES)
def test_matches_reference(name, dtype):
    assert_matches_resnet_fixture(*run_fixture(name, dtype), dtype)


@pytest.mark.parametrize("name", ["rn_basic_original_eval", "rn_basic_selective_train",
                                  "rn_bottle_original_train_noZb"])
def test_no_grad_heatmaps_match_reference(name):
    data, model, x, y, R = run_fixture(name, torch.float64, grad=False)
    assert not R.requires_grad
    assert rel_err(y, data["y"]) <= 1e-9
    assert rel_err(R, data["R"]) <= 1e-9


def test_selective_label_fixture_explains_argmin_not_the_label():
    data = load_fixture("rn_basic_selective_label_eval")
    model = build_from_fixture(data, torch.float64)
    assert bool((data["label"] != data["y"].argmin(1)).all())
    with torch.no_grad():
        _, R = model(data["x"], classes=data["label"])
    for image in range(len(R)):
        assert rel_err(R[image], data["R"][image]) > 1e-3


def test_triton_backend_matches_reference():
    # Every step through a kernel, the residual sum's too (the Triton interpreter runs them on the
    # CPU, about ten seconds); test_residual_kernels.py checks that the pass launches those.
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert_matches_resnet_fixture(*run_fixture("rn_basic_original_eval", torch.float64, backend="triton",
                                               device=device), torch.float64)


# ---------------------------------------------------------------------------------------------
# The fused pass against the slow per-step one
# ---------------------------------------------------------------------------------------------

def random_net(block, layers, widths, num_classes=3, seed=0, stem_width=6):
    torch.manual_seed(seed)
    net = ResNet(block, layers, num_classes, stem_width=stem_width, widths=widths).double()
    with torch.no_grad():  # BatchNorms away from their initial identity, so every fold matters
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
        net.fc.bias.uniform_(-0.5, 0.5)
    return net


FUZZ = [  # block, layers, widths, image size, mode, Zb, overwrite un-pool, seed
    ("basic", (2, 1, 1, 1), (4, 6, 8, 10), (37, 45), "train", True, True, 0),
    ("basic", (1, 2), (3, 5), (29, 23), "eval", False, True, 1),
    ("basic", (1, 1, 1), (4, 4, 6), (33, 35), "eval", True, False, 2),
    ("bottleneck", (1, 2, 1, 1), (2, 3, 4, 5), (37, 45), "eval", False, True, 3),
    ("bottleneck", (2, 1, 1), (2, 3, 4), (31, 27), "train", True, False, 4),
    ("bottleneck", (1, 1), (3, 2), (25, 33), "train", False, True, 5),
]


def fuzz_id(case):
    block, layers, widths, size, mode, zb, overwrite, seed = case
    return (f"{block}-{''.join(map(str, layers))}-w{'.'.join(map(str, widths))}-{size[0]}x{size[1]}-{mode}-"
            f"{'zb' if zb else 'eps'}-{'overwrite' if overwrite else 'sum'}-seed{seed}")


@pytest.mark.parametrize("case", FUZZ, ids=[fuzz_id(c) for c in FUZZ])
def test_fused_pass_matches_the_per_step_pass(case):
    block, layers, widths, size, mode, zb, overwrite, seed = case
    net = random_net(block, layers, widths, seed=seed).train(mode == "train")
    plan = build_resnet_plan(net)
    x = torch.rand(2, 3, *size, dtype=torch.float64, requires_grad=True)
    acts = run_resnet_forward(plan, x)
    at_input = classifier_input_relevance(plan.classifier, acts.classifier_input, acts.y, 0.01, "all", False, None,
                                          bias_detached_in_all=True)
    fused = resnet_relevance(plan, acts, 0.01, zb, at_input, overwrite_unpool=overwrite)
    slow = reference_resnet_relevance(plan, acts, 0.01, zb, at_input, overwrite_unpool=overwrite)
    assert fused.shape == (2, 3, 3, *size)
    assert rel_err(fused, slow) <= 1e-10
    weights = torch.randn_like(fused)
    inputs = [x] + list(net.parameters())
    grads_fused = torch.autograd.grad((fused * weights).sum(), inputs, retain_graph=True, allow_unused=True)
    grads_slow = torch.autograd.grad((slow * weights).sum(), inputs, allow_unused=True)
    names = ["x"] + [name for name, _ in net.named_parameters()]
    for name, ours, theirs, like in zip(names, grads_fused, grads_slow, inputs):
        ours = ours if ours is not None else torch.zeros_like(like)
        theirs = theirs if theirs is not None else torch.zeros_like(like)
        assert rel_err(ours, theirs) <= 1e-10, name


def test_summing_unpool_gives_gradient_times_input_where_the_reference_loses_relevance():
    # With the epsilon rule everywhere and a tiny e, LRP of a ReLU network is gradient x input;
    # only the authors' overwriting un-pool departs from it (their README: by 54-80%).
    net = random_net("basic", (1, 1), (4, 6), num_classes=2, seed=7).eval()
    x = torch.rand(2, 3, 33, 31, dtype=torch.float64, requires_grad=True)
    y = net(x)
    grad = torch.autograd.grad(y[:, 1].sum(), x)[0]
    model = IsResNetFast(net, e=1e-9, Zb=False, reference_quirks=False).eval()
    with torch.no_grad():
        _, summed = model(x, classes=torch.tensor([1, 1]))
        model.reference_quirks = True
        _, overwritten = model(x, classes=torch.tensor([1, 1]))
    assert rel_err(summed[:, 0], x * grad) <= 1e-5
    assert rel_err(overwritten[:, 0], x * grad) >= 0.05


@pytest.mark.parametrize("block, widths", [("basic", (4, 6)), ("bottleneck", (2, 3))], ids=["basic", "bottleneck"])
def test_without_quirks_the_summed_maps_are_gradient_times_input(block, widths):
    # The check: e=1e-12, Zb off, eval, float64, one map per class summed over the
    # classes against sum_c x * dy_c/dx, within 1e-6, for both blocks (downsampling ones included).
    net = random_net(block, (1, 2), widths, num_classes=3, seed=11).eval()
    x = torch.rand(2, 3, 33, 31, dtype=torch.float64, requires_grad=True)
    grad = torch.autograd.grad(net(x).sum(), x)[0]  # images are independent in eval mode
    model = IsResNetFast(net, e=1e-12, Zb=False, reference_quirks=False).eval()
    with torch.no_grad():
        _, maps = model(x)
    assert maps.shape[1] == 3
    assert rel_err(maps.sum(1), x * grad) <= 1e-6


# ---------------------------------------------------------------------------------------------
# IsResNetFast's interface
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def small_net():
    return random_net("basic", (1, 1), (4, 6), num_classes=4, seed=3)


def maps_and_grads(model, x, classes=None, pick=None):
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    _, R = model(x, classes=classes)
    if pick is not None:
        R = R[torch.arange(len(pick)), pick].unsqueeze(1)
    torch.manual_seed(1)
    (R * torch.randn_like(R)).sum().backward()
    grads = {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for name, p in model.resnet.named_parameters()}
    return R.detach(), x.grad, grads


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("selective", [False, True], ids=["logit", "selective"])
def test_classes_pick_the_map_of_explain_all_and_no_map_reaches_the_fc_bias(small_net, selective, mode):
    model = IsResNetFast(small_net, selective=selective).train(mode == "train")
    x = torch.rand(3, 3, 27, 29, dtype=torch.float64)
    classes = torch.tensor([2, 0, 3])
    one, grad_x_one, grads_one = maps_and_grads(model, x, classes=classes)
    model.explain = "all"
    picked, grad_x_all, grads_all = maps_and_grads(model, x, pick=classes)
    assert one.shape == (3, 1, 3, 27, 29)
    assert rel_err(one, picked) <= 1e-12
    assert rel_err(grad_x_one, grad_x_all) <= 1e-10
    for name in grads_one:
        assert rel_err(grads_one[name], grads_all[name]) <= 1e-10, name
    assert grads_all["fc.bias"].abs().max() == 0  # "all" detaches the classifier bias too
    assert grads_all["fc.weight"].abs().max() > 0


@pytest.mark.parametrize("explain, selective, maps", [
    ("all", False, 4), ("top", False, 1), ("lowest", False, 1), ("random", False, 1), ("sum", False, 1),
    ("all", True, 4), ("top", True, 1), ("lowest", True, 1), ("random", True, 1),
], ids=lambda v: str(v))
def test_heatmap_shapes(small_net, explain, selective, maps):
    model = IsResNetFast(small_net, explain=explain, selective=selective).eval()
    with torch.no_grad():
        y, R = model(torch.rand(2, 3, 21, 19, dtype=torch.float64))
    assert y.shape == (2, 4)
    assert R.shape == (2, maps, 3, 21, 19)
    assert model.maps_per_image == maps
    assert bool(torch.isfinite(R).all()) and R.abs().max() > 0


def test_heat_false_returns_the_plain_logits(small_net):
    model = IsResNetFast(small_net, heat=False).eval()
    x = torch.rand(2, 3, 24, 24, dtype=torch.float64)
    y = model(x)
    assert isinstance(y, torch.Tensor)
    assert torch.equal(y, small_net(x))


def test_train_mode_moves_running_statistics_like_the_plain_forward(small_net):
    twin = copy.deepcopy(small_net).train()
    model = IsResNetFast(small_net).train()
    x = torch.rand(3, 3, 25, 23, dtype=torch.float64)
    y, _ = model(x)
    expected = twin(x)
    assert rel_err(y, expected) <= 1e-12
    ours, theirs = small_net.state_dict(), twin.state_dict()
    for key in theirs:
        if "running" in key or "num_batches" in key:
            assert rel_err(ours[key], theirs[key]) <= 1e-12, key


def test_no_grad_and_autograd_heatmaps_agree(small_net):
    model = IsResNetFast(small_net).eval()
    x = torch.rand(2, 3, 23, 26, dtype=torch.float64)
    with torch.no_grad():
        _, fast = model(x)
    _, full = model(x.requires_grad_())
    assert full.requires_grad
    assert rel_err(fast, full) <= 1e-12


@pytest.mark.parametrize("setting, value, error", [
    ("e", 0, ValueError), ("e", "0.01", TypeError), ("Zb", 1, TypeError), ("heat", None, TypeError),
    ("reference_quirks", "yes", TypeError), ("explain", "best", ValueError), ("backend", "cuda", ValueError),
], ids=lambda v: str(v))
def test_bad_settings_are_refused(small_net, setting, value, error):
    with pytest.raises(error):
        IsResNetFast(small_net, **{setting: value})


def test_selective_sum_and_bad_classes_are_refused(small_net):
    with pytest.raises(ValueError, match="selective"):
        IsResNetFast(small_net, selective=True, explain="sum")
    model = IsResNetFast(small_net)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        model(torch.rand(2, 3, 20, 20, dtype=torch.float64), classes=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full((1, 3, 20, 20), float("nan"), dtype=torch.float64))


@pytest.mark.parametrize("prefix", ["", "model."], ids=["plain", "lightning"])
def test_loads_checkpoints_of_the_authors_layout(small_net, prefix, tmp_path):
    source = IsResNetFast(small_net)
    state = {prefix + key: value for key, value in source.state_dict().items()}
    state[prefix + "LRPBlock.model.conv1.weight"] = torch.zeros(1)  # the LRP block's aliases are ignored
    torch.save({"state_dict": state}, tmp_path / "checkpoint.pt")
    target = IsResNetFast.from_checkpoint(tmp_path / "checkpoint.pt", random_net("basic", (1, 1), (4, 6), 4, seed=9))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_mismatched_state_dict_is_explained(small_net):
    model = IsResNetFast(small_net)
    other = IsResNetFast(random_net("basic", (1, 1), (4, 6), num_classes=5))
    with pytest.raises(RuntimeError, match="size mismatch: fc.weight"):
        model.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="'resnet.' prefix"):
        model.load_state_dict(small_net.state_dict())


# ---------------------------------------------------------------------------------------------
# Models the pass cannot read
# ---------------------------------------------------------------------------------------------

class SqueezeExcitation(nn.Module):
    def forward(self, x):
        return x


def with_in_place_relu(net):
    net.layer2[0].relu.inplace = True


def without_downsample(net):
    net.layer2[0].downsample = None


def with_unknown_child(net):
    net.layer1[0].se = SqueezeExcitation()


def with_pre_activation_order(net):
    block = net.layer1[0]
    conv1 = block._modules.pop("conv1")
    block._modules["conv1"] = conv1  # now registered after bn1, as in a pre-activation block


def with_a_plain_downsample(net):
    net.layer2[0].downsample = nn.Conv2d(4, 6, 1, stride=2, bias=False)


def without_avgpool(net):
    del net.avgpool


def with_conv_bias(net):
    net.layer1[0].conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=True)


def with_a_stage_entry_that_is_no_block(net):
    net.layer2 = nn.Sequential(nn.ReLU())


def with_a_dilated_maxpool(net):
    net.maxpool = nn.MaxPool2d(3, 2, 1, dilation=2)


@pytest.mark.parametrize("change, words", [
    (with_in_place_relu, "'layer2.0.relu' is an in-place ReLU"),
    (without_downsample, "'layer2.0' changes the shape (4 to 6 channels, strided) but has no downsample"),
    (with_unknown_child, "'layer1.0' (BasicBlock) holds 'layer1.0.se'"),
    (with_pre_activation_order, "'layer1.0' registers its modules in the order bn1, conv2, bn2, conv1"),
    (with_a_plain_downsample, "'layer2.0.downsample' is a Conv2d"),
    (without_avgpool, "no module 'avgpool'"),
    (with_conv_bias, "'layer1.0.conv2' has a bias"),
    (with_a_stage_entry_that_is_no_block, "'layer2.0' is a ReLU(), not a residual block"),
    (with_a_dilated_maxpool, "'maxpool' must have dilation 1"),
], ids=lambda v: getattr(v, "__name__", None))
def test_unreadable_model_is_refused_naming_the_module(change, words):
    net = random_net("basic", (1, 1), (4, 6))
    change(net)
    with pytest.raises(UnsupportedModelError) as info:
        IsResNetFast(net)
    assert words in str(info.value)


def test_reads_blocks_with_one_relu_per_position(small_net):
    # The authors' resnet.py names the ReLUs relu1, relu2 (the last after the sum), not one relu.
    model = IsResNetFast(small_net).eval()
    x = torch.rand(2, 3, 22, 26, dtype=torch.float64)
    with torch.no_grad():
        _, shared = model(x)
        for stage in (small_net.layer1, small_net.layer2):
            for block in stage:
                del block.relu
                block.relu1, block.relu2 = nn.ReLU(), nn.ReLU()
        _, per_position = model(x)
    assert rel_err(per_position, shared) <= 1e-14


def test_change_after_construction_is_caught_at_forward(small_net):
    model = IsResNetFast(small_net)
    small_net.layer1[0].relu.inplace = True
    with pytest.raises(UnsupportedModelError, match="'layer1.0.relu'"):
        model(torch.rand(1, 3, 20, 20, dtype=torch.float64))


def test_something_that_is_not_a_module_is_refused():
    with pytest.raises(TypeError, match="call it"):
        IsResNetFast(resnet18)
