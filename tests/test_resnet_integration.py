"""A ResNet goes wherever a DenseNet goes: training and its checkpoints (``load_model``), the
Lightning module (``architecture="resnet18"``, ...), and ``isnet-fast explain`` on our checkpoints
and on the authors' ``LRPResNet`` state dicts, with errors that name the ``--arch`` that fits."""

from __future__ import annotations

import argparse
import importlib
import math
import re
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import isnet_fast
from isnet_fast import DenseNet, IsDenseFast, IsResNetFast, ResNet, resnet18, resnet50, resnet152
from isnet_fast.architectures import (RESNET_ARCHITECTURES, build_resnet, infer_resnet_config, known_resnet_name,
                                      resnet_config, wrap_network)
from isnet_fast.training import TrainConfig, isdensefast_settings, load_checkpoint, load_model, train

TINY = dict(block="basic", layers=(1, 1, 1, 1), stem_width=8, widths=(8, 12, 16, 24))
TINY_DENSENET = dict(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2)
CLASSES = 3
SIZE = 32


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_resnet(seed=0, **overrides) -> ResNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNet(num_classes=CLASSES, **dict(TINY, **overrides))


def toy_data(n=4, seed=0):
    """Images, labels and masks (the left half is foreground)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, SIZE, SIZE, generator=generator)
    labels = torch.arange(n) % CLASSES
    masks = torch.zeros(n, 3, SIZE, SIZE)
    masks[..., : SIZE // 2] = 1
    return images, labels, masks


def quiet(**kwargs) -> TrainConfig:
    return TrainConfig(**dict(dict(epochs=1, batch_size=2, P=0.5, lr=1e-2, progress=False), **kwargs))


# ----------------------------------------------------------------------------- configurations


def test_resnet_config_reads_the_layers_and_rebuilds_the_same_network():
    with torch.device("meta"):  # the layout only: no memory, no initialisation cost
        named = {"resnet18": resnet18(), "resnet50": resnet50(), "resnet152": resnet152(num_classes=7)}
        wide = ResNet("bottleneck", (1, 2), num_classes=5, stem_width=16, widths=(8, 16), width_per_group=128,
                      dropout=0.25)
    for name, net in named.items():
        config = resnet_config(net)
        assert known_resnet_name(config) == name
        assert infer_resnet_config(net.state_dict()) == config  # the shapes tell the same
    assert resnet_config(named["resnet152"])["num_classes"] == 7
    config = resnet_config(IsResNetFast(tiny_resnet(dropout=0.5)))
    assert config == dict(TINY, layers=[1, 1, 1, 1], widths=[8, 12, 16, 24], num_classes=CLASSES,
                          width_per_group=64, dropout=0.5)
    assert known_resnet_name(config) is None
    wide_config = resnet_config(wide)
    assert wide_config["width_per_group"] == 128 and wide_config["dropout"] == 0.25
    with torch.device("meta"):
        rebuilt = build_resnet(wide_config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in wide.state_dict().items()}
    assert infer_resnet_config(DenseNet(num_classes=2, **TINY_DENSENET).state_dict()) is None
    with pytest.raises(ValueError, match="block"):
        build_resnet(dict(wide_config, block="dense"))


def test_wrap_network_picks_the_wrapper_and_refuses_reference_pairing_for_a_resnet():
    assert isinstance(wrap_network(tiny_resnet(), e=0.1), IsResNetFast)
    assert isinstance(wrap_network(DenseNet(num_classes=2, **TINY_DENSENET), reference_pairing=False), IsDenseFast)
    with pytest.raises(ValueError, match="reference_pairing=False chooses the consumers of a DenseNet"):
        wrap_network(tiny_resnet(), reference_pairing=False)


# ----------------------------------------------------------------------------- training


def test_a_resnet_trains_and_its_checkpoint_rebuilds_the_same_model(tmp_path):
    images, labels, masks = toy_data()
    model = IsResNetFast(tiny_resnet(dropout=0.2), e=0.05, Zb=False, explain="lowest", selective=True,
                         reference_quirks=False)
    path = tmp_path / "resnet.pt"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = train(model, images, labels, masks, quiet(), checkpoint_path=path)  # 2 steps
    assert math.isfinite(history[0]["loss"]) and history[0]["heatmap_loss"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained

    checkpoint = load_checkpoint(path)
    assert checkpoint["resnet_config"] == resnet_config(model) and "densenet_config" not in checkpoint
    assert checkpoint["isdensefast"] == {"e": 0.05, "Zb": False, "reference_quirks": False, "explain": "lowest",
                                         "selective": True}
    assert "reference_pairing" not in isdensefast_settings(checkpoint)  # IsResNetFast takes no such argument

    again = load_model(path)
    assert isinstance(again, IsResNetFast) and not again.training
    assert (again.e, again.Zb, again.explain, again.selective, again.reference_quirks) == \
        (0.05, False, "lowest", True, False)
    model.eval()
    with torch.no_grad():
        y, R = model(images)
        y_again, R_again = again(images)
    assert torch.equal(y, y_again) and torch.equal(R, R_again)
    assert R.shape == (4, 1, 3, SIZE, SIZE) and R.abs().sum() > 0
    # and it is a state dict IsResNetFast reads directly
    direct = IsResNetFast.from_checkpoint(path, tiny_resnet(dropout=0.2), **isdensefast_settings(checkpoint))
    with torch.no_grad():
        assert torch.equal(direct.eval()(images)[1], R)


def test_a_resnet_run_resumes_with_its_variant(tmp_path):
    images, labels, masks = toy_data()
    path = tmp_path / "resume.pt"
    train(IsResNetFast(tiny_resnet(), explain="random"), images, labels, masks, quiet(), checkpoint_path=path)
    resumed = IsResNetFast(tiny_resnet(seed=1))
    with pytest.warns(UserWarning, match="trained with explain='random'"):
        history = train(resumed, images, labels, masks, quiet(epochs=2), checkpoint_path=path, resume=True)
    assert [record["epoch"] for record in history] == [1, 2] and resumed.explain == "random"


def test_a_plain_resnet_trains_without_heatmaps_and_p_needs_the_wrapper(tmp_path):
    images, labels, masks = toy_data()
    path = tmp_path / "plain.pt"
    history = train(tiny_resnet(), images, labels, None, quiet(P=0.0), checkpoint_path=path)
    assert history[0]["heatmap_loss"] == 0 and math.isfinite(history[0]["loss"])
    assert load_checkpoint(path)["resnet_config"]["layers"] == [1, 1, 1, 1]
    assert isinstance(load_model(path), IsResNetFast)
    with pytest.raises(TypeError, match="IsResNetFast"):
        train(tiny_resnet(), images, labels, masks, quiet())


# ----------------------------------------------------------------------------- Lightning


class _StubLightningModule(nn.Module):
    """What IsDenseFastLightning needs of ``lightning.pytorch.LightningModule`` to be built and run
    without a Trainer, for machines without Lightning (tests/test_lightning.py covers the real one)."""

    def save_hyperparameters(self, ignore=None):
        self.hparams = {}

    def log_dict(self, *args, **kwargs):
        pass


@pytest.fixture
def lightning(monkeypatch):
    """``isnet_fast.lightning``, imported over a stub of Lightning where Lightning is not installed."""
    try:
        import lightning.pytorch  # noqa: F401
    except ImportError:
        package, pytorch = types.ModuleType("lightning"), types.ModuleType("lightning.pytorch")
        pytorch.LightningModule = _StubLightningModule
        package.pytorch = pytorch
        monkeypatch.setitem(sys.modules, "lightning", package)
        monkeypatch.setitem(sys.modules, "lightning.pytorch", pytorch)
    # Set, then delete: the import below starts afresh, and the undo removes what it left behind.
    monkeypatch.setitem(sys.modules, "isnet_fast.lightning", None)
    monkeypatch.delitem(sys.modules, "isnet_fast.lightning")
    monkeypatch.setattr(isnet_fast, "lightning", None, raising=False)
    return importlib.import_module("isnet_fast.lightning")


def tiny_named_resnet(num_classes=1000, dropout=None):
    """Stands in for resnet18 & co.: the same builder signature, a fraction of the cost."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return ResNet(num_classes=num_classes, dropout=dropout, **TINY)


def test_lightning_builds_an_isresnetfast_from_a_resnet_name(lightning, monkeypatch):
    monkeypatch.setitem(RESNET_ARCHITECTURES, "resnet18", tiny_named_resnet)
    assert "resnet18" in lightning.ARCHITECTURES and "densenet121" in lightning.ARCHITECTURES
    torch.manual_seed(0)
    module = lightning.IsDenseFastLightning(False, False, CLASSES, architecture="resnet18", selective=True,
                                            highest=True, reference_quirks=False)
    assert isinstance(module.model, IsResNetFast) and module.network is module.model.resnet
    assert (module.model.explain, module.model.selective, module.model.reference_quirks) == ("lowest", True, False)
    assert isinstance(module.network.fc, nn.Sequential) and module.network.fc[0].p == 0.5  # the default dropout
    images, labels, masks = toy_data()
    loss, classifier, heatmap, size = module._losses((images, masks[:, :1], labels[:, None]))
    assert size == 4 and math.isfinite(loss.item()) and heatmap is not None and heatmap.item() > 0
    loss.backward()
    assert module.network.conv1.weight.grad is not None and module.network.conv1.weight.grad.abs().sum() > 0
    assert all(key.startswith("model.resnet.") for key in module.state_dict())

    # its state dict loads into an IsResNetFast, and the authors' LRPResNet's into it
    plain = IsResNetFast(tiny_named_resnet(CLASSES, dropout=0.5))
    plain.load_state_dict(module.state_dict())
    authors = OrderedDict(("resnet." + k, v + 1 if v.is_floating_point() else v)
                          for k, v in module.network.state_dict().items())
    authors["LRPBlock.x"] = torch.zeros(1)
    module.load_state_dict(authors)
    assert torch.equal(module.network.conv1.weight, authors["resnet.conv1.weight"])
    module.eval()
    plain.eval()
    assert not torch.equal(plain(images)[1], module(images)[1])  # the authors' weights replaced ours


def test_lightning_resnet_dicts_instances_and_imagenet_weights(lightning, monkeypatch):
    from_dict = lightning.IsDenseFastLightning(False, False, CLASSES, architecture=dict(TINY), dropout=None)
    assert isinstance(from_dict.model, IsResNetFast) and isinstance(from_dict.network.fc, nn.Linear)
    net = tiny_resnet()
    from_instance = lightning.IsDenseFastLightning(False, False, CLASSES, architecture=net)
    assert from_instance.network is net
    densenet = lightning.IsDenseFastLightning(False, False, CLASSES, architecture=TINY_DENSENET)
    assert isinstance(densenet.model, IsDenseFast) and densenet.network is densenet.DenseNet  # unchanged

    monkeypatch.setitem(RESNET_ARCHITECTURES, "resnet50", tiny_named_resnet)
    imagenet = tiny_named_resnet(num_classes=1000).state_dict()
    asked = []
    monkeypatch.setattr(lightning, "_imagenet_state_dict", lambda name: asked.append(name) or imagenet)
    torch.manual_seed(5)
    pretrained = lightning.IsDenseFastLightning(False, False, CLASSES, architecture="resnet50", pretrained=True)
    assert asked == ["resnet50"]
    for key, value in pretrained.network.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, imagenet[key]), key
    assert pretrained.network.fc[1].out_features == CLASSES  # a new classifier, as for the DenseNet

    with pytest.raises(ValueError, match="fc has 3 outputs but classes=5"):
        lightning.IsDenseFastLightning(False, False, 5, architecture=tiny_resnet())
    with pytest.raises(ValueError, match="pretrained=True needs an architecture name"):
        lightning.IsDenseFastLightning(False, False, CLASSES, architecture=dict(TINY), pretrained=True)
    with pytest.raises(ValueError, match="reference_pairing"):
        lightning.IsDenseFastLightning(False, False, CLASSES, architecture=dict(TINY), reference_pairing=True)
    with pytest.raises(ValueError, match=r"architecture must be one of .*resnet152.*got 'resnet200'"):
        lightning.IsDenseFastLightning(False, False, CLASSES, architecture="resnet200")


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated")  # Lightning's own notices
def test_lightning_trains_a_resnet_and_reloads_its_checkpoint(tmp_path):
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    from isnet_fast.lightning import IsDenseFastLightning

    torch.manual_seed(0)
    module = IsDenseFastLightning(False, False, CLASSES, architecture=dict(TINY), LR=1e-2)
    images, labels, masks = toy_data()
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(TensorDataset(images, masks[:, :1], labels[:, None]), batch_size=2))
    assert trainer.global_step == 2 and math.isfinite(trainer.callback_metrics["train_loss/Sum_step"].item())
    assert all(not torch.equal(before[k], v.detach()) for k, v in module.named_parameters())
    path = tmp_path / "resnet.ckpt"
    trainer.save_checkpoint(path)
    restored = IsDenseFastLightning.load_from_checkpoint(path, map_location="cpu")
    assert isinstance(restored.model, IsResNetFast) and restored.hparams.architecture == dict(TINY)
    for key, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


# ----------------------------------------------------------------------------- explain


def explain(*argv):
    from isnet_fast.explain import add_explain_parser

    parser = argparse.ArgumentParser(prog="isnet-fast")
    add_explain_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["explain", *map(str, argv)])
    return args.handler(args, args.subparser)


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isnet-fast explain: error: "), captured.err
    return lines[0]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("matplotlib")
    path = tmp_path_factory.mktemp("images") / "cat.png"
    pixels = (torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return path


@pytest.fixture(scope="module")
def authors_resnet18(tmp_path_factory):
    """The authors' LRPResNet state dict: ``resnet.*`` keys plus an ``LRPBlock`` alias; and the network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = resnet18(num_classes=CLASSES)
    for name, buffer in net.named_buffers():
        if "running" in name:  # BatchNorm statistics that differ from the defaults
            buffer.uniform_(0.5, 1.5)
    state = OrderedDict(("resnet." + key, value) for key, value in net.state_dict().items())
    state["LRPBlock.x"] = net.conv1.weight.detach().clone()
    path = tmp_path_factory.mktemp("authors") / "lrpresnet.pt"
    torch.save(state, path)
    return path, net.eval()


def test_explain_our_resnet_checkpoint(tmp_path, image, capsys):
    path = tmp_path / "ours.pt"
    train(IsResNetFast(tiny_resnet(), e=0.05, Zb=False), *toy_data(), quiet(), checkpoint_path=path)
    assert explain("--checkpoint", path, image, "--out", tmp_path / "out", "--all-classes") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"cat_class{k}.png" for k in range(CLASSES)]
    assert "e=0.05 and the epsilon rule at the input; 3 classes; images at (32, 32)" in capsys.readouterr().out

    assert explain("--checkpoint", path, image, "--out", tmp_path / "no", "--arch", "resnet18") == 2
    message = one_line_error(capsys)
    assert "the checkpoint records its architecture: leave out --arch" in message
    assert "its weights fit none of resnet18" in message and "layers 1-1-1-1" in message


def test_explain_the_authors_lrpresnet_state_dicts(tmp_path, image, authors_resnet18, capsys):
    from isnet_fast.explain import load_explained_model, read_image

    path, net = authors_resnet18
    model, _ = load_explained_model(str(path), "resnet18")
    assert isinstance(model, IsResNetFast) and model.resnet.fc.out_features == CLASSES
    for key, value in net.state_dict().items():
        assert torch.equal(model.resnet.state_dict()[key], value), key

    # Lightning's prefix: model.resnet.* and model.LRPBlock.*
    lightning_path = tmp_path / "lightning.ckpt"
    state = torch.load(path, weights_only=True)
    torch.save({"state_dict": OrderedDict(("model." + k, v) for k, v in state.items()), "epoch": 3}, lightning_path)
    for checkpoint in (path, lightning_path):
        assert explain("--checkpoint", checkpoint, image, "--out", tmp_path / "out", "--arch", "resnet18") == 0
        with torch.no_grad():
            logits = IsResNetFast(net, Zb=True)(read_image(str(image))[None])[0][0]
        top = int(logits.argmax())
        assert f"top class {top} (logit {float(logits[top]):.3f})" in capsys.readouterr().out


@pytest.mark.parametrize("options, expected", [
    ([], r"does not record its architecture; pass --arch \(densenet121/.*/resnet152\) and --classes: "
         r"its weights fit --arch resnet18 --classes 3"),
    (["--arch", "resnet34"], r"does not fit --arch resnet34 --classes 3: .*layer1\.2\.conv1\.weight missing.*; "
                             r"its weights fit --arch resnet18 --classes 3"),
    (["--arch", "densenet121"], r"holds a ResNet's weights, which do not fit --arch densenet121: "
                                r"its weights fit --arch resnet18 --classes 3"),
    (["--arch", "resnet18", "--classes", "5"], r"fc\.weight: checkpoint \(3, 512\) vs model \(5, 512\)"),
])
def test_explain_errors_name_the_arch_that_fits(tmp_path, image, authors_resnet18, capsys, options, expected):
    assert explain("--checkpoint", authors_resnet18[0], image, "--out", tmp_path, *options) == 2
    assert re.search(expected, one_line_error(capsys))
    assert not list(tmp_path.iterdir())


def test_explain_errors_for_a_densenet_checkpoint_and_an_unknown_arch(tmp_path, image, capsys):
    from isnet_fast.explain import ExplainError, load_explained_model

    net = DenseNet(num_classes=2, **TINY_DENSENET)
    path = tmp_path / "original.pt"
    torch.save({("DenseNet." + k): v for k, v in net.state_dict().items()}, path)
    assert explain("--checkpoint", path, image, "--out", tmp_path / "out", "--arch", "resnet18") == 2
    message = one_line_error(capsys)
    assert "holds a DenseNet's weights, which do not fit --arch resnet18" in message
    assert "its weights fit none of densenet121" in message
    with pytest.raises(ExplainError, match=r"unknown --arch 'resnet200'; choose one of .*resnet18"):
        load_explained_model(str(path), "resnet200")
    with pytest.raises(SystemExit):  # the parser refuses it before any file is read
        explain("--checkpoint", path, image, "--arch", "vgg16")
    assert "invalid choice: 'vgg16'" in capsys.readouterr().err
