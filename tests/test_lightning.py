"""Tests of the Lightning module (isnet_fast.lightning): training steps, hyperparameters, logging,
checkpoints (ours and the original's) and two-process DDP on the CPU with gloo.

Run as a script (``python tests/test_lightning.py --ddp-worker OUT STRATEGY``) this file is the
DDP training job that ``test_ddp_two_processes_end_with_identical_weights`` starts.
"""

from __future__ import annotations

import csv
import importlib
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")

from lightning.pytorch.callbacks import Callback  # noqa: E402

from isnet_fast import DenseNet, IsDenseFast  # noqa: E402
from isnet_fast.lightning import IsDense121Lightning, IsDenseFastLightning  # noqa: E402

# Lightning's own notices, not this package's
pytestmark = [pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
              pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated")]

REPO = Path(__file__).resolve().parents[1]
TINY = dict(growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=8, bn_size=2)
CLASSES = 3
SIZE = 32
DDP_TIMEOUT_S = 180


def make_data(n, classes=CLASSES, multiMask=False, multiLabel=False, mask_channels=1, seed=0):
    """Images, rectangular random foreground masks and labels, as TensorDataset tensors."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, SIZE, SIZE, generator=g)
    shape = (n, classes, mask_channels, SIZE, SIZE) if multiMask else (n, mask_channels, SIZE, SIZE)
    masks = torch.zeros(shape)
    for index in masks.view(-1, mask_channels, SIZE, SIZE):
        top, left = torch.randint(0, SIZE // 2, (2,), generator=g).tolist()
        index[:, top:top + SIZE // 2, left:left + SIZE // 2] = 1
    if multiLabel:
        labels = (torch.rand(n, classes, generator=g) > 0.5).float()
    else:
        labels = torch.randint(0, classes, (n, 1), generator=g)  # B x 1, the original's layout
    return images, masks, labels


def loader(tensors, batch_size=4):
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=False)


def make_trainer(max_steps, logger=False, **kwargs):
    kwargs.setdefault("limit_val_batches", 1)
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=logger,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     log_every_n_steps=1, **kwargs)


def make_module(**kwargs):
    kwargs.setdefault("multiLabel", False)
    kwargs.setdefault("multiMask", False)
    kwargs.setdefault("classes", CLASSES)
    kwargs.setdefault("architecture", TINY)
    kwargs.setdefault("LR", 1e-2)
    torch.manual_seed(0)
    return IsDenseFastLightning(**kwargs)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def changed(before, module):
    return [k for k, v in module.named_parameters() if not torch.equal(before[k], v.detach())]


def read_csv_metrics(log_dir):
    with open(Path(log_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = {}
    for row in rows:
        for key, value in row.items():
            if value not in ("", None):
                columns.setdefault(key, []).append(float(value))
    return columns


# ------------------------------------------------------------------------------------------------
def test_training_steps_log_the_originals_metrics(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = make_module()
    before = snapshot(module)
    logger = CSVLogger(tmp_path, name="logs")
    data = make_data(12, mask_channels=3)
    trainer = make_trainer(3, logger=logger, gradient_clip_val=1.0)  # the original's recommendation
    trainer.fit(module, loader(data), loader(make_data(4, seed=1)))

    assert trainer.global_step == 3
    columns = read_csv_metrics(logger.log_dir)
    for name in ("train_loss/Classifier", "train_loss/Heatmap", "train_loss/Sum"):
        for suffix in ("_step", "_epoch"):
            assert name + suffix in columns, sorted(columns)
            assert all(math.isfinite(v) for v in columns[name + suffix])
    for name in ("val_loss", "val_loss/Classifier", "val_loss/Heatmap"):
        assert name in columns and all(math.isfinite(v) for v in columns[name])
    # Sum = (1 - P) Classifier + P Heatmap at each step
    for c, h, s in zip(columns["train_loss/Classifier_step"], columns["train_loss/Heatmap_step"],
                       columns["train_loss/Sum_step"]):
        assert s == pytest.approx(0.3 * c + 0.7 * h, rel=1e-5)
    assert len(changed(before, module)) == len(before)  # every parameter trained
    assert module.hparams.P == 0.7 and module.hparams.e == 10e-2  # the original's defaults


def test_plain_densenet_without_heat():
    module = make_module(heat=False)
    images, _, labels = make_data(8)
    before = snapshot(module)
    trainer = make_trainer(2)
    trainer.fit(module, loader((images, labels)), loader((images, labels)))
    assert math.isfinite(trainer.callback_metrics["train_loss_step"].item())
    assert "val_loss" in trainer.callback_metrics and "train_loss/Heatmap_step" not in trainer.callback_metrics
    assert changed(before, module)
    assert torch.is_tensor(module(images[:2]))  # logits only
    module.heat = True
    assert module.model.heat and len(module(images[:2])) == 2


@pytest.mark.parametrize("case", ["multiLabel", "multiMask", "Adam", "per_class_cut", "no_dropout"])
def test_hyperparameters_run_a_step(case):
    kwargs, data, batch_size = {}, None, 4
    if case == "multiLabel":
        kwargs = dict(multiLabel=True, Cweight=torch.tensor([1.0, 2.0, 3.0]))
        data = make_data(4, multiLabel=True)
    elif case == "multiMask":
        kwargs = dict(multiMask=True)
        data = make_data(4, multiMask=True)
    elif case == "Adam":
        kwargs = dict(optim="Adam", LR=1e-3)
    elif case == "per_class_cut":
        # a per-class cut rescales the per-image loss by broadcasting, as the original: batch == classes
        kwargs = dict(cut=torch.tensor([0.5, 1.0, 2.0]), cut2=[20.0, 25.0, 30.0])
        batch_size = CLASSES
    elif case == "no_dropout":
        kwargs = dict(dropout=None, Zb=False, e=1e-2, A=2, B=1, d=0.8, Ea=2, normRoI=False, detachNorm=True)
    data = data if data is not None else make_data(batch_size)
    module = make_module(**kwargs)
    before = snapshot(module)
    trainer = make_trainer(1, limit_val_batches=0)
    trainer.fit(module, loader(data, batch_size))
    assert math.isfinite(trainer.callback_metrics["train_loss/Sum_step"].item())
    assert math.isfinite(trainer.callback_metrics["train_loss/Heatmap_step"].item())
    assert changed(before, module)
    if case == "multiLabel":
        assert torch.equal(module.Cweight, torch.tensor([1.0, 2.0, 3.0]))
        logits = torch.zeros(1, CLASSES)
        labels = torch.ones(1, CLASSES)
        expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, pos_weight=module.Cweight)
        assert torch.allclose(module.classifier_loss(logits, labels), expected)
    if case == "per_class_cut":
        assert torch.is_tensor(module.cut) and torch.is_tensor(module.cut2)
        assert "cut" not in module.state_dict()  # non-persistent: checkpoints hold only the network


def test_densenet_instance_as_architecture():
    net = DenseNet(num_classes=CLASSES, **TINY)
    module = IsDenseFastLightning(False, False, CLASSES, architecture=net)
    assert module.DenseNet is net and "architecture" not in module.hparams
    images, masks, labels = make_data(2)
    logits, heatmaps = module(images)
    assert logits.shape == (2, CLASSES) and heatmaps.shape == (2, CLASSES, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="classes"):
        IsDenseFastLightning(False, False, 5, architecture=DenseNet(num_classes=CLASSES, **TINY))
    with pytest.raises(ValueError, match="architecture"):
        IsDenseFastLightning(False, False, CLASSES, architecture="vgg16")  # resnet50 is a ResNet now


def test_optimizers():
    sgd = make_module(LR=0.05).configure_optimizers()
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["lr"] == 0.05 and sgd.defaults["momentum"] == 0.99 and sgd.defaults["weight_decay"] == 0
    adam = make_module(optim="Adam", LR=1e-4).configure_optimizers()
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 1e-4
    frozen = make_module()
    frozen.DenseNet.features.conv0.weight.requires_grad_(False)
    params = [p for group in frozen.configure_optimizers().param_groups for p in group["params"]]
    assert all(p is not frozen.DenseNet.features.conv0.weight for p in params)
    with pytest.raises(ValueError, match="optim"):
        make_module(optim="RMSprop")


def test_losses_match_heatmap_loss_and_cross_entropy():
    from isnet_fast import heatmap_loss

    module = make_module(A=2, d=0.7, Ea=3, cut=0.5, cut2=10).eval()
    images, masks, labels = make_data(2)
    logits, heatmaps = module(images)
    classifier, heatmap = module.compound_loss(logits, labels, heatmaps, masks)
    assert torch.allclose(classifier, torch.nn.functional.cross_entropy(logits, labels.squeeze(1)))
    expected = heatmap_loss(heatmaps, masks, cut=0.5, cut2=10, A=2, B=3, d=0.7, E=3)
    assert torch.allclose(heatmap, expected)
    one_hot = torch.nn.functional.one_hot(labels.squeeze(1), CLASSES).float()  # probabilities work too
    assert torch.allclose(module.classifier_loss(logits, one_hot), classifier)


def test_test_step_collects_results_and_predict():
    module = make_module()
    data = make_data(6)
    trainer = make_trainer(1)
    trainer.test(module, loader(data))
    logits, labels, images, heatmaps = module.TestResults
    assert logits.shape == (6, CLASSES) and labels.shape == (6, 1)
    assert images.shape == (6, 3, SIZE, SIZE) and heatmaps.shape == (6, CLASSES, 3, SIZE, SIZE)
    predictions = trainer.predict(module, loader(data))
    assert predictions[0][1].shape == (4, CLASSES, 3, SIZE, SIZE)


def test_checkpoint_loads_into_isdensefast_and_back(tmp_path):
    module = make_module(multiLabel=True, Cweight=torch.tensor([1.0, 2.0, 0.5]))
    trainer = make_trainer(1, limit_val_batches=0)
    trainer.fit(module, loader(make_data(4, multiLabel=True)))
    path = tmp_path / "isnet.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert all(k.startswith("model.DenseNet.") for k in state), sorted(state)[:5]

    # into a bare IsDenseFast, by its own load_state_dict (it strips "model.") and from the file
    def tiny_densenet():
        net = DenseNet(num_classes=CLASSES, **TINY)
        net.classifier = torch.nn.Sequential(torch.nn.Dropout(0.5), net.classifier)
        return net

    plain = IsDenseFast(tiny_densenet(), e=module.model.e)
    plain.load_state_dict(state)
    from_file = IsDenseFast.from_checkpoint(path, tiny_densenet())
    for key, value in from_file.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    for key, value in module.model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    x = make_data(2)[0]
    module.eval()
    plain.eval()
    assert torch.equal(plain(x)[1], module(x)[1])

    # and back into the Lightning module, hyperparameters (architecture, Cweight) included
    restored = IsDenseFastLightning.load_from_checkpoint(path, map_location="cpu")
    assert restored.hparams.architecture == TINY and restored.multiLabel
    assert torch.equal(restored.Cweight, torch.tensor([1.0, 2.0, 0.5]))
    for key, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_loads_an_original_lightning_checkpoint(tmp_path):
    """The original module's keys: DenseNet.*, LRPBlock.* (aliases) and Cweight (a Parameter)."""
    torch.manual_seed(1)
    source = DenseNet(num_classes=CLASSES, **TINY)
    source.classifier = torch.nn.Sequential(torch.nn.Dropout(0.5), source.classifier)
    for name, buffer in source.named_buffers():
        if "running" in name:
            buffer.uniform_(0.5, 1.5)
    original = OrderedDict(("DenseNet." + k, v) for k, v in source.state_dict().items())
    original["LRPBlock.LRPFinalLayers.classifier.weight"] = source.classifier[1].weight.detach()
    original["LRPBlock.LRPDenseBlock1.DenseNet.features.denseblock1.denselayer1.norm1.weight"] = \
        source.features.denseblock1.denselayer1.norm1.weight.detach()
    original["Cweight"] = torch.tensor([1.0, 4.0, 2.0])
    hparams = dict(multiLabel=True, multiMask=False, classes=CLASSES, e=10e-2, heat=True, Zb=True,
                   pretrained=False, LR=1e-3, P=0.7, E=10, saveMaps=False, mapsLocation="", optim="SGD",
                   Cweight=torch.tensor([1.0, 4.0, 2.0]), A=1, B=3, d=0.9, Ea=1, normRoI=True, norm=True,
                   cut=1, cut2=25, alternativeCut=False, detachNorm=False, var=False, eps=1e-10,
                   momentum=0.99)

    module = make_module(multiLabel=True, Cweight=torch.ones(CLASSES))
    module.load_state_dict(original)
    for key, value in source.state_dict().items():
        assert torch.equal(module.DenseNet.state_dict()[key], value), key
    assert torch.equal(module.Cweight, original["Cweight"])

    path = tmp_path / "original.ckpt"
    torch.save({"state_dict": original, "hyper_parameters": hparams, "pytorch-lightning_version": "1.9.5"}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the original's default E etc. warn nothing
        restored = IsDense121Lightning.load_from_checkpoint(path, map_location="cpu", architecture=TINY)
    assert restored.multiLabel and restored.P == 0.7
    # hyperparameters without the variants' names: the Original ISNet, with the original's loss
    assert (restored.model.explain, restored.model.selective, restored.labelLogit) == ("all", False, False)
    assert restored.loss_options["alternativeForeground"] == "L2"
    for key, value in source.state_dict().items():
        assert torch.equal(restored.DenseNet.state_dict()[key], value), key


def test_pretrained_loads_imagenet_features(monkeypatch):
    import isnet_fast.lightning as isl
    from isnet_fast import densenet121

    torch.manual_seed(2)
    imagenet = densenet121(num_classes=1000).state_dict()
    monkeypatch.setattr(isl, "_imagenet_state_dict", lambda name: imagenet)
    module = IsDenseFastLightning(False, False, CLASSES, pretrained=True)
    for key, value in module.DenseNet.features.state_dict().items():
        assert torch.equal(value, imagenet["features." + key]), key
    assert module.DenseNet.classifier[1].out_features == CLASSES
    with pytest.raises(ValueError, match="pretrained"):
        make_module(pretrained=True)  # a dict architecture has no ImageNet weights


def test_warnings_for_options_without_effect():
    with pytest.warns(UserWarning, match="Ea"):
        make_module(E=5)
    with pytest.warns(UserWarning, match="saveMaps"):
        make_module(saveMaps=True)
    with pytest.warns(UserWarning, match="multiLabel"):
        make_module(Cweight=torch.ones(CLASSES))
    with pytest.raises(ValueError, match="P"):
        make_module(P=1.5)


# ------------------------------------------------------------------------------------------------
# ISNet variants under the authors' newer names (ISNetLightningZe.ISNetLgt) and ours.
@pytest.mark.parametrize("kwargs, expected", [
    ({}, ("all", False)),  # the Original ISNet
    (dict(multiple=True), ("all", False)),
    (dict(highest=True), ("top", False)),
    (dict(highest=True, multiple=False), ("top", False)),
    (dict(selective=True, highest=True), ("lowest", True)),  # the Selective ISNet: argmin(y)
    (dict(selective=True, highest=True, multiple=False), ("lowest", True)),
    (dict(randomLogit=True), ("random", False)),  # the Stochastic ISNet
    (dict(multiple=False), ("sum", False)),
    (dict(selective=True), ("all", True)),
    (dict(labelLogit=True), ("all", False)),
    (dict(labelLogit=True, selective=True, multiple=False), ("all", True)),
    (dict(explain="random", selective=True), ("random", True)),
    (dict(explain="lowest"), ("lowest", False)),
])
def test_the_authors_names_map_onto_explain_and_selective(kwargs, expected):
    module = make_module(**kwargs)
    assert (module.model.explain, module.model.selective) == expected
    assert (module.explain, module.selective) == expected
    assert module.labelLogit == kwargs.get("labelLogit", False)
    for name, value in kwargs.items():
        assert module.hparams[name] == value  # saved, so load_from_checkpoint rebuilds the variant


def test_the_authors_defaults():
    module = make_module()
    for name, default in dict(selective=False, highest=False, randomLogit=False, labelLogit=False,
                              norm=True, multiple=None, explain=None).items():
        assert module.hparams[name] == default, name
    # ours keeps the original module's loss by default; their newer module's 'hybrid' is one argument away
    assert module.hparams.alternativeForeground == "L2"
    assert module.loss_options["alternativeForeground"] == "L2" and module.loss_options["norm"] is True
    hybrid = make_module(alternativeForeground="hybrid", norm="RoIMean")
    assert hybrid.loss_options["alternativeForeground"] == "hybrid" and hybrid.loss_options["norm"] == "RoIMean"


@pytest.mark.parametrize("kwargs, match", [
    (dict(highest=True, randomLogit=True), "set only one"),
    (dict(labelLogit=True, highest=True), "set only one"),
    (dict(labelLogit=True, randomLogit=True), "set only one"),
    (dict(multiple=True, highest=True), "set only one"),
    (dict(multiple=True, randomLogit=True), "set only one"),
    (dict(multiple=True, labelLogit=True), "set only one"),
    (dict(randomLogit=True, selective=True), "randomLogit and selective"),
    (dict(selective=True, multiple=False), "highest=True"),
    (dict(explain="top", highest=True), "leave out highest"),
    (dict(explain="all", multiple=True), "leave out multiple"),
    (dict(explain="sum", selective=True), "sum"),
    (dict(explain="best"), "explain must be one of"),
    (dict(labelLogit=True, multiLabel=True), "labelLogit"),
    (dict(randomLogit=True, multiMask=True), "multiMask"),
    (dict(multiple=False, multiMask=True), "multiMask"),
])
def test_invalid_variant_combinations_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_module(**kwargs)


def _spy(monkeypatch, module):
    """Records the model's calls (classes given, logits) and what the heatmap loss receives."""
    import isnet_fast.lightning as isl

    calls, losses = [], []
    real_forward, real_loss = module.model.forward, isl.heatmap_loss

    def forward(x, classes=None):
        output = real_forward(x, classes)
        calls.append((classes, output[0].detach().clone() if isinstance(output, tuple) else output.detach()))
        return output

    def loss(heatmaps, masks, **kwargs):
        losses.append((tuple(heatmaps.shape), masks.detach().clone(), kwargs))
        return real_loss(heatmaps, masks, **kwargs)

    monkeypatch.setattr(module.model, "forward", forward)
    monkeypatch.setattr(isl, "heatmap_loss", loss)
    return calls, losses


@pytest.mark.parametrize("case", ["original", "selective", "stochastic", "top", "sum", "selective_all",
                                  "selective_random", "labelLogit", "selective_labelLogit", "multiMask_highest",
                                  "multiMask_labelLogit", "hybrid_loss"])
def test_each_variant_trains_a_step(monkeypatch, case):
    kwargs = {"original": {}, "selective": dict(selective=True, highest=True), "stochastic": dict(randomLogit=True),
              "top": dict(highest=True), "sum": dict(multiple=False), "selective_all": dict(selective=True),
              "selective_random": dict(explain="random", selective=True), "labelLogit": dict(labelLogit=True),
              "selective_labelLogit": dict(labelLogit=True, selective=True),
              "multiMask_highest": dict(multiMask=True, highest=True),
              "multiMask_labelLogit": dict(multiMask=True, labelLogit=True),
              "hybrid_loss": dict(selective=True, highest=True, alternativeForeground="hybrid",
                                  norm="absRoIMean")}[case]
    data = make_data(4, multiMask=kwargs.get("multiMask", False))
    module = make_module(**kwargs)
    before = snapshot(module)
    calls, losses = _spy(monkeypatch, module)
    trainer = make_trainer(1)
    trainer.fit(module, loader(data), loader(data))  # one training step, one validation step
    assert trainer.global_step == 1
    for name in ("train_loss/Classifier_step", "train_loss/Heatmap_step", "train_loss/Sum_step", "val_loss",
                 "val_loss/Heatmap"):
        assert math.isfinite(trainer.callback_metrics[name].item()), name
    assert changed(before, module)
    maps = CLASSES if module.model.explain == "all" and not module.labelLogit else 1
    assert len(losses) >= 2 and all(shape == (4, maps, 3, SIZE, SIZE) for shape, _, _ in losses)
    labels = data[2].squeeze(1)
    for classes, _ in calls:  # the labels are explained in training and validation, and only with labelLogit
        if module.labelLogit:
            assert torch.equal(classes, labels)
        else:
            assert classes is None
    if kwargs.get("multiMask"):  # each image's mask for the class its one map explains
        for (classes, logits), (_, masks, _) in zip(calls, losses):
            explained = classes if classes is not None else logits.argmax(1)
            assert torch.equal(masks, data[1][torch.arange(4), explained].unsqueeze(1))
    if case == "hybrid_loss":
        assert all(kw["alternativeForeground"] == "hybrid" and kw["norm"] == "absRoIMean" for _, _, kw in losses)


def test_labelLogit_takes_one_hot_labels_and_explains_them_in_tests():
    module = make_module(labelLogit=True)
    images, masks, labels = make_data(6)
    one_hot = torch.nn.functional.one_hot(labels.squeeze(1), CLASSES).float()
    assert torch.equal(module.label_classes(one_hot), labels.squeeze(1))
    assert torch.equal(module.label_classes(labels), labels.squeeze(1))
    trainer = make_trainer(1)
    trainer.test(module, loader((images, masks, labels)))
    logits, _, _, heatmaps = module.TestResults
    assert heatmaps.shape == (6, 1, 3, SIZE, SIZE)
    module.eval()
    with torch.no_grad():
        for c in range(CLASSES):  # each map is its label's
            chosen = labels.squeeze(1) == c
            if chosen.any():
                expected = module.model(images, classes=torch.full((6,), c))[1][chosen]
                assert torch.allclose(heatmaps[chosen], expected, atol=1e-6)
        assert module(images)[1].shape == (6, CLASSES, 3, SIZE, SIZE)  # without labels: explain='all'


def test_variant_survives_a_checkpoint(tmp_path):
    module = make_module(selective=True, highest=True)
    trainer = make_trainer(1, limit_val_batches=0)
    trainer.fit(module, loader(make_data(4)))
    path = tmp_path / "selective.ckpt"
    trainer.save_checkpoint(path)
    restored = IsDenseFastLightning.load_from_checkpoint(path, map_location="cpu")
    assert (restored.model.explain, restored.model.selective) == ("lowest", True)
    x = make_data(2)[0]
    restored.eval()
    module.eval()
    with torch.no_grad():
        assert restored(x)[1].shape == (2, 1, 3, SIZE, SIZE)
        assert torch.allclose(restored(x)[1], module(x)[1])


def test_missing_lightning_says_how_to_install(monkeypatch):
    for name in ("lightning", "lightning.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import lightning` fail
    monkeypatch.delitem(sys.modules, "isnet_fast.lightning", raising=False)
    with pytest.raises(ImportError, match=r"pip install isnet-fast\[lightning\]"):
        importlib.import_module("isnet_fast.lightning")


def _subprocess_env(**extra):
    """The environment, with this checkout first on the path."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def test_import_isnet_fast_does_not_import_lightning():
    code = ("import sys, isnet_fast; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning')]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=_subprocess_env())
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------------
# DDP: two processes on the CPU (gloo), run as subprocesses so that a hang fails within a timeout.
def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_processes_end_with_identical_weights(tmp_path):
    """Two ranks launched side by side, as torchrun or SLURM launch them (Lightning sees LOCAL_RANK
    and launches nothing itself): both start at once, which shortens the start-up."""
    env = _subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), NODE_RANK="0", WORLD_SIZE="2")
    for name in ("RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_NTASKS"):
        env.pop(name, None)  # no outer launcher: Lightning's LightningEnvironment reads LOCAL_RANK
    processes, logs, hung = [], [], []
    try:
        for rank in (0, 1):
            logs.append(open(tmp_path / f"rank{rank}.log", "w+"))
            processes.append(subprocess.Popen(
                [sys.executable, __file__, "--ddp-worker", str(tmp_path), "ddp"],
                env={**env, "LOCAL_RANK": str(rank)}, stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + DDP_TIMEOUT_S
        # wait for both; stop early when one fails (the other would wait for it until the deadline)
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in processes):
                break
            time.sleep(0.2)
    finally:
        hung = [p for p in processes if p.poll() is None]
        for process in hung:
            process.kill()
            process.wait()
        output = ""
        for rank, log in enumerate(logs):
            log.seek(0)
            output += f"--- rank {rank} ---\n{log.read()[-3000:]}\n"
            log.close()
    failed = [p.args for p in processes if p not in hung and p.returncode != 0]
    assert not failed, output
    if hung:
        pytest.fail(f"DDP training did not finish in {DDP_TIMEOUT_S} s:\n{output}")

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r, saved in enumerate(ranks):
        assert saved["world_size"] == 2 and saved["global_step"] == 3, (r, saved["world_size"])
    # the ranks saw different data (DistributedSampler) ...
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])
    # ... trained (the parameters moved from the common start) ...
    params = ranks[0]["parameters"]
    assert any(not torch.equal(params[k], ranks[0]["initial"][k]) for k in params)
    # ... and end with identical parameters: DDP averaged their gradients.
    assert params.keys() == ranks[1]["parameters"].keys()
    for key, value in params.items():
        assert torch.equal(value, ranks[1]["parameters"][key]), key
    # BatchNorm running statistics are per process (each rank's last batch), as in any DDP run
    # without SyncBatchNorm; the step counts agree.
    for key, value in ranks[0]["buffers"].items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(value, ranks[1]["buffers"][key]), key


class _SaveState(Callback):
    """Saves each rank's parameters, buffers, starting parameters and first batch."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_start(self, trainer, pl_module):
        self.initial = {k: v.detach().cpu().clone() for k, v in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.first_batch = batch[0].detach().cpu().clone()

    def on_train_end(self, trainer, pl_module):
        torch.save({
            "parameters": {k: v.detach().cpu().clone() for k, v in pl_module.named_parameters()},
            "buffers": {k: v.detach().cpu().clone() for k, v in pl_module.named_buffers()},
            "initial": self.initial, "first_batch": self.first_batch,
            "world_size": trainer.world_size, "global_step": trainer.global_step,
        }, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def _ddp_worker(out_dir, strategy):
    """Three steps of DDP on two CPU processes; strategy 'ddp' (gloo) or e.g. 'ddp_spawn'."""
    from lightning.pytorch.strategies import DDPStrategy

    torch.set_num_threads(1)  # two processes on two cores

    L.seed_everything(0, verbose=False)
    module = IsDenseFastLightning(False, False, CLASSES, architecture=TINY, LR=0.05)
    if strategy == "ddp":
        strategy = DDPStrategy(process_group_backend="gloo")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[_SaveState(out_dir)])
    trainer.fit(module, loader(make_data(32, seed=3)))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--ddp-worker":
        _ddp_worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"usage: {sys.argv[0]} --ddp-worker OUT_DIR STRATEGY")
