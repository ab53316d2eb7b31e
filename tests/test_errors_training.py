"""No silent failures in training, checkpoints, the heatmap loss and ``isnet-fast explain``.

Every case here used to pass silently (NaN weights, a constant loss without gradient, a resume
that quietly lost its exactness, stale temporary files) or to fail with an unhelpful error (an
empty EOFError, ``KeyError: 101``, torch's 13,000-character key list, a traceback).
"""

import argparse
import json
import math
import subprocess
import sys
import textwrap
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from isnet_fast import DenseNet, IsDenseFast, densenet121, heatmap_loss
from isnet_fast.loss import NonFiniteHeatmapError
from isnet_fast.engine import UnsupportedModelError
from isnet_fast.training import (CHECKPOINT_FORMAT, NonFiniteError, TrainConfig, load_checkpoint, load_model,
                                 save_checkpoint, train)
from test_training import quiet, toy_data as training_toy_data

TINY = dict(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2, num_classes=3)


def tiny_model(seed=0, **settings):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IsDenseFast(DenseNet(**TINY), **settings)


def toy_data(n=8, size=16, seed=0):
    return training_toy_data(n, size, seed)


def assert_short(message, *words):
    """The message names every word (case-insensitive) and is short: a few lines, no dump."""
    message = str(message)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    assert len(message) < 400 and message.count("\n") <= 3, message


def all_finite(model):
    return all(torch.isfinite(t).all() for t in list(model.parameters()) + list(model.buffers())
               if t.is_floating_point())


# ----------------------------------------------------------------------------- non-finite training


def test_a_huge_learning_rate_stops_training_with_a_clear_error():
    images, labels, masks = toy_data()
    with pytest.raises(NonFiniteError) as caught:
        train(tiny_model(), images, labels, masks, quiet(epochs=5, lr=1e10, clip_norm=None))
    error = caught.value
    assert isinstance(error, RuntimeError)
    # Which goes first depends on rounding (the run diverges chaotically): a step's loss, heatmaps or
    # gradients, or, caught at the epoch's end, a BatchNorm's running variance (its outputs stay finite)
    if error.what == "weights":
        assert error.epoch >= 1 and error.step == 0
        assert_short(error, f"epoch {error.epoch}:", "weights went non-finite", "not saved", "learning rate",
                     "skip_nonfinite")
    else:
        assert error.what in ("loss", "heatmaps", "gradients") and error.epoch >= 1 and error.step >= 1
        assert_short(error, f"epoch {error.epoch}, step {error.step}", error.what, "non-finite", "learning rate",
                     "skip_nonfinite")


def test_nan_data_stops_training_naming_the_heatmaps():
    images, labels, masks = toy_data()
    images[5, 0, 3, 3] = math.nan  # in the second batch of the first epoch's order or the first: either way
    with pytest.raises(NonFiniteError) as caught:
        train(tiny_model(check_finite=False), images, labels, masks, quiet())
    assert caught.value.what == "heatmaps" and caught.value.epoch == 1
    assert_short(caught.value, "epoch 1, step", "heatmaps", "NaN")


def test_nan_data_stops_a_plain_classifier_naming_the_loss():
    images, labels, _ = toy_data()
    images[:, 1] = math.nan
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = DenseNet(**TINY)
    with pytest.raises(NonFiniteError) as caught:
        train(net, images, labels, None, quiet(P=0.0))
    assert (caught.value.what, caught.value.epoch, caught.value.step) == ("loss", 1, 1)
    assert_short(caught.value, "epoch 1, step 1 of 2", "loss")


def test_nan_training_stops_with_the_last_good_checkpoint_intact_and_loadable(tmp_path):
    images, labels, masks = toy_data()
    path = tmp_path / "run.pt"
    model = tiny_model(check_finite=False)

    def poison_the_data_after_epoch_1(record):
        if record["epoch"] == 1:
            images[:, :, 0, 0] = math.nan

    with pytest.raises(NonFiniteError) as caught:
        train(model, images, labels, masks, quiet(epochs=3), checkpoint_path=path,
              on_epoch_end=poison_the_data_after_epoch_1)
    assert (caught.value.epoch, caught.value.step) == (2, 1)
    assert_short(caught.value, "epoch 2, step 1", "epoch 1", str(path), "intact")
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == 1 and len(checkpoint["history"]) == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    loaded = load_model(path)
    with torch.no_grad():
        y, R = loaded(toy_data()[0][:2])
    assert torch.isfinite(y).all() and torch.isfinite(R).all()
    IsDenseFast.from_checkpoint(path, DenseNet(**TINY))


def test_weights_that_went_non_finite_are_never_saved(tmp_path, monkeypatch):
    import isnet_fast.training as training

    images, labels, masks = toy_data()
    path = tmp_path / "run.pt"
    train(tiny_model(), images, labels, masks, quiet(), checkpoint_path=path)
    real_make_optimizer = training.make_optimizer

    def overflowing_last_step(model, config):  # the epoch's last update overflows: no later step would see it
        optimizer = real_make_optimizer(model, config)
        real_step, calls = optimizer.step, []

        def step(*args, **kwargs):
            result = real_step(*args, **kwargs)
            calls.append(1)
            if len(calls) == 2:
                with torch.no_grad():
                    model.DenseNet.classifier.weight[0, 0] = math.inf
            return result

        optimizer.step = step
        return optimizer

    monkeypatch.setattr(training, "make_optimizer", overflowing_last_step)
    with pytest.raises(NonFiniteError) as caught:
        train(tiny_model(), images, labels, masks, quiet(epochs=2), checkpoint_path=path, resume=True)
    assert (caught.value.what, caught.value.epoch) == ("weights", 2)
    assert_short(caught.value, "epoch 2", "weights", "DenseNet.classifier.weight", "not saved", "epoch 1")
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == 1 and torch.isfinite(checkpoint["state_dict"]["DenseNet.classifier.weight"]).all()


def test_skip_nonfinite_skips_the_bad_steps_counts_them_and_trains_on(tmp_path):
    images, labels, masks = toy_data(n=12)
    images[7, 2, 5, 5] = math.nan  # one image: one batch per epoch
    model = tiny_model(check_finite=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = tmp_path / "log.jsonl"
    history = train(model, images, labels, masks, quiet(epochs=2, skip_nonfinite=True), log_path=log)
    assert [record["skipped_steps"] for record in history] == [1, 1]
    assert [json.loads(line)["skipped_steps"] for line in log.read_text().splitlines()] == [1, 1]
    for record in history:
        assert all(math.isfinite(record[key]) for key in ("loss", "classification_loss", "heatmap_loss"))
    assert all_finite(model), "the skipped batches left nothing behind (weights, BatchNorm statistics)"
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the other steps trained"


def test_skip_nonfinite_still_stops_when_every_step_is_bad():
    images, labels, masks = toy_data()
    images[:, 0] = math.nan
    with pytest.raises(NonFiniteError) as caught:
        train(tiny_model(check_finite=False), images, labels, masks, quiet(skip_nonfinite=True))
    assert_short(caught.value, "epoch 1", "all 2 steps", "skipped")


# ----------------------------------------------------------------------------- broken checkpoint files


@pytest.fixture
def broken_files(tmp_path):
    good = tmp_path / "good.pt"
    train(tiny_model(), *toy_data(), quiet(), checkpoint_path=good)
    data = good.read_bytes()
    # (names that do not hold the words the messages must say)
    files = {"truncated": tmp_path / "half.pt", "empty": tmp_path / "zero.pt", "text": tmp_path / "notes.pt"}
    files["truncated"].write_bytes(data[:len(data) // 2])
    files["empty"].write_bytes(b"")
    files["text"].write_text("hello, this is not a checkpoint\n")
    return files


BROKEN_WORDS = {"truncated": ["truncated"], "empty": ["empty"], "text": ["not a torch checkpoint"]}


@pytest.mark.parametrize("kind", list(BROKEN_WORDS))
@pytest.mark.parametrize("reader", ["from_checkpoint", "load_checkpoint", "load_model"])
def test_a_broken_checkpoint_file_is_named_and_explained(broken_files, kind, reader):
    path = broken_files[kind]
    read = {"from_checkpoint": lambda: IsDenseFast.from_checkpoint(path, DenseNet(**TINY)),
            "load_checkpoint": lambda: load_checkpoint(path),
            "load_model": lambda: load_model(path)}[reader]
    with pytest.raises(ValueError) as caught:
        read()
    assert_short(caught.value, str(path), *BROKEN_WORDS[kind])
    assert "weights_only" not in str(caught.value)


class NotAllowed:
    """A class the weights-only unpickler refuses (unpickling it could run code)."""


def test_a_checkpoint_holding_python_objects_is_refused_without_advising_weights_only_false(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"state_dict": {}, "extra": NotAllowed()}, path)
    with pytest.raises(ValueError) as caught:
        IsDenseFast.from_checkpoint(path, DenseNet(**TINY))
    assert_short(caught.value, str(path), "NotAllowed", "Python objects")
    assert "weights_only" not in str(caught.value)


def explain(*argv):
    from isnet_fast.explain import add_explain_parser

    parser = argparse.ArgumentParser(prog="isnet-fast")
    add_explain_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["explain", *map(str, argv)])
    return args.handler(args, args.subparser)


def one_line_error(capsys):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isnet-fast explain: error: "), err
    return lines[0]


@pytest.mark.parametrize("kind", list(BROKEN_WORDS) + ["objects"])
def test_explain_names_a_broken_checkpoint_in_one_line(tmp_path, broken_files, kind, capsys):
    if kind == "objects":
        path = tmp_path / "objects.pt"
        torch.save({"state_dict": {}, "extra": NotAllowed()}, path)
        words = ["NotAllowed"]
    else:
        path, words = broken_files[kind], BROKEN_WORDS[kind]
    assert explain("--checkpoint", path, tmp_path / "any.png", "--out", tmp_path / "out") == 2
    line = one_line_error(capsys)
    assert_short(line, str(path), *words)
    assert "weights_only" not in line


# ----------------------------------------------------------------------------- state dicts that do not fit


def test_a_checkpoint_of_another_architecture_gets_a_short_message(tmp_path):
    path = tmp_path / "densenet121.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save({"state_dict": IsDenseFast(densenet121(num_classes=14)).state_dict()}, path)
    with pytest.raises(RuntimeError) as caught:
        IsDenseFast.from_checkpoint(path, DenseNet(**TINY))
    assert isinstance(caught.value, ValueError)
    assert_short(caught.value, "blocks 6-12-24-16", "growth 32", "blocks 1-1", "growth 4", "unexpected keys",
                 "size mismatch", "classifier.weight (14, 1024)", "(3, 10)")


def test_another_number_of_classes_names_the_classifier():
    state = tiny_model().state_dict()
    model = IsDenseFast(DenseNet(**dict(TINY, num_classes=5)))
    before = model.DenseNet.features.conv0.weight.clone()
    with pytest.raises(RuntimeError) as caught:
        model.load_state_dict(state)
    assert_short(caught.value, "size mismatch", "classifier.weight (3, 10) vs the model's (5, 10)")
    assert torch.equal(model.DenseNet.features.conv0.weight, before), "refused before anything was loaded"


def test_a_bare_densenet_state_dict_says_where_it_goes():
    with pytest.raises(ValueError) as caught:
        tiny_model().load_state_dict(DenseNet(**TINY).state_dict())
    assert_short(caught.value, "'DenseNet.' prefix", "model.DenseNet.load_state_dict")


class TorchvisionLikeDenseNet(nn.Module):
    """torchvision's DenseNet layout (in-place ReLUs, no fReLU or AdaptPool), under its module's name."""

    def __init__(self, block_config=(6, 12, 24, 16), growth_rate=32, num_classes=1000):
        super().__init__()
        ours = DenseNet(growth_rate=growth_rate, block_config=block_config, num_classes=num_classes)
        kept = [(name, module) for name, module in ours.features.named_children()
                if name not in ("special", "fReLU", "AdaptPool")]
        self.features = nn.Sequential(OrderedDict(kept))
        self.features.relu0 = nn.ReLU(inplace=True)
        self.classifier = ours.classifier


TorchvisionLikeDenseNet.__module__ = "torchvision.models.densenet"
TorchvisionLikeDenseNet.__name__ = TorchvisionLikeDenseNet.__qualname__ = "DenseNet"


def test_a_torchvision_densenet_is_refused_saying_how_to_load_its_weights():
    with pytest.raises(UnsupportedModelError) as caught:
        IsDenseFast(TorchvisionLikeDenseNet(num_classes=7))
    assert_short(caught.value, "torchvision", "isnet_fast.densenet121(num_classes=7)",
                 "load_state_dict(tv_model.state_dict())")
    with pytest.raises(UnsupportedModelError) as caught:  # another configuration: our DenseNet's arguments
        IsDenseFast(TorchvisionLikeDenseNet(block_config=(1, 2), growth_rate=4, num_classes=2))
    assert_short(caught.value, "isnet_fast.DenseNet(growth_rate=4, block_config=(1, 2)", "num_classes=2")


def test_the_suggested_loading_works_for_torchvision():
    tvm = pytest.importorskip("torchvision.models")
    tv = tvm.densenet121(weights=None, num_classes=7)
    with pytest.raises(UnsupportedModelError, match=r"isnet_fast\.densenet121\(num_classes=7\)"):
        IsDenseFast(tv)
    net = densenet121(num_classes=7)
    net.load_state_dict(tv.state_dict())
    IsDenseFast(net)


# ----------------------------------------------------------------------------- heatmap_loss arguments


def loss_inputs():
    generator = torch.Generator().manual_seed(0)
    heatmaps = torch.randn(2, 3, 3, 16, 16, generator=generator) * 1e-2
    masks = torch.zeros(2, 3, 16, 16)
    masks[..., 4:12, 4:12] = 1
    return heatmaps.requires_grad_(), masks


@pytest.mark.parametrize("kwargs, words", [
    (dict(cut=0), ["cut=0", "> 0"]),
    (dict(cut=-1.0), ["cut=-1", "> 0"]),
    (dict(cut=torch.tensor([1.0, 0.0, 2.0]), cut2=torch.tensor([5.0, 5.0, 5.0])), ["cut holds 0", "> 0"]),
    (dict(cut2=0), ["cut2=0", "> 0"]),
    (dict(cut=30, cut2=25), ["cut2 must be >= cut", "30", "25"]),
    (dict(d=1.5), ["d=1.5", "(0, 1]"]),
    (dict(d=0), ["d=0", "(0, 1]"]),
    (dict(d=-0.5), ["d=-0.5", "(0, 1]"]),
    (dict(E=0), ["E=0", "> 0"]),
    (dict(E=-1), ["E=-1", "> 0"]),
    (dict(E=math.nan), ["E=nan", "> 0"]),
], ids=["cut=0", "cut<0", "cut-tensor-0", "cut2=0", "cut2<cut", "d>1", "d=0", "d<0", "E=0", "E<0", "E=nan"])
def test_heatmap_loss_refuses_arguments_that_give_nan_or_no_gradient(kwargs, words):
    heatmaps, masks = loss_inputs()
    if "cut" in kwargs and torch.is_tensor(kwargs["cut"]):
        heatmaps, masks = heatmaps[:1], masks[:1]  # a per-class cut needs batch == classes or 1
    with pytest.raises(ValueError) as caught:
        heatmap_loss(heatmaps, masks, **kwargs)
    assert_short(caught.value, *words)


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_heatmap_loss_refuses_heatmaps_without_a_finite_value(value):
    heatmaps, masks = loss_inputs()
    with pytest.raises(NonFiniteHeatmapError) as caught:
        heatmap_loss(torch.full_like(heatmaps, value), masks)
    assert isinstance(caught.value, ValueError)
    assert_short(caught.value, "heatmaps", "NaN")


def test_heatmap_loss_legal_edges_still_work():
    heatmaps, masks = loss_inputs()
    # d=1: GWRP is the plain mean of the background
    loss = heatmap_loss(heatmaps, masks, d=1, cut=2, cut2=2, A=1, B=0)
    grad, = torch.autograd.grad(loss, heatmaps)
    assert torch.isfinite(loss) and grad.abs().sum() > 0
    # partly NaN heatmaps: replaced as documented, the rest still trains
    partly = heatmaps.detach().clone()
    partly[0, 0, 0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    partly.requires_grad_()
    loss = heatmap_loss(partly, masks)
    grad, = torch.autograd.grad(loss, partly)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # alternativeCut bounds the sum over classes with cut: cut2 < cut is then consistent
    assert torch.isfinite(heatmap_loss(heatmaps, masks, cut=5, cut2=4, alternativeCut=True))


# ----------------------------------------------------------------------------- resume of another run


@pytest.fixture
def sgd_checkpoint(tmp_path):
    images, labels, masks = toy_data()
    path = tmp_path / "sgd.pt"
    train(tiny_model(), images, labels, masks, quiet(), checkpoint_path=path)
    return path


@pytest.mark.parametrize("change, words", [
    (dict(config=dict(optimizer="adam", lr=1e-3)), ["optimizer", "'sgd' in the checkpoint", "'adam' now"]),
    (dict(config=dict(weight_decay=1e-4)), ["weight_decay", "0.0 in the checkpoint", "0.0001 now"]),
    (dict(config=dict(momentum=0.5)), ["momentum", "0.9", "0.5"]),
    (dict(config=dict(batch_size=2)), ["batch_size", "4 in the checkpoint", "2 now"]),
    (dict(n=6), ["number of images", "8 in the checkpoint", "6 now"]),
    (dict(labels=True), ["labels", "fingerprints differ"]),
], ids=["sgd->adam", "weight_decay", "momentum", "batch_size", "fewer-images", "other-labels"])
def test_resume_refuses_a_checkpoint_of_another_run(sgd_checkpoint, change, words):
    images, labels, masks = toy_data(n=change.get("n", 8))
    if change.get("labels"):
        labels = (labels + 1) % 3
    resumed = tiny_model(seed=1)
    before = {k: v.clone() for k, v in resumed.state_dict().items()}
    with pytest.raises(ValueError) as caught:
        train(resumed, images, labels, masks, quiet(epochs=2, **change.get("config", {})),
              checkpoint_path=sgd_checkpoint, resume=True)
    assert_short(caught.value, f"cannot resume from {sgd_checkpoint}", *words)
    assert all(torch.equal(v, before[k]) for k, v in resumed.state_dict().items()), "nothing was loaded"
    assert load_checkpoint(sgd_checkpoint)["epoch"] == 1


def test_resume_of_the_same_run_still_works_and_old_checkpoints_resume_with_a_warning(sgd_checkpoint):
    images, labels, masks = toy_data()
    history = train(tiny_model(seed=1), images, labels, masks, quiet(epochs=2), checkpoint_path=sgd_checkpoint,
                    resume=True)
    assert [record["epoch"] for record in history] == [1, 2]
    old = load_checkpoint(sgd_checkpoint)
    del old["run"]  # as written before runs were recorded
    save_checkpoint(sgd_checkpoint, old)
    with pytest.warns(UserWarning, match="cannot|without checking"):
        history = train(tiny_model(seed=1), images, labels, masks, quiet(epochs=3), checkpoint_path=sgd_checkpoint,
                        resume=True)
    assert [record["epoch"] for record in history] == [1, 2, 3]
    # a lower learning rate (how a run that went non-finite goes on) resumes, but says it is another run now
    with pytest.warns(UserWarning, match="lr=0.001"):
        history = train(tiny_model(seed=1), images, labels, masks, quiet(epochs=4, lr=1e-3),
                        checkpoint_path=sgd_checkpoint, resume=True)
    assert [record["epoch"] for record in history] == [1, 2, 3, 4]
    old = load_checkpoint(sgd_checkpoint)
    del old["run"]
    save_checkpoint(sgd_checkpoint, old)
    # what the old checkpoint's train_config tells is still checked
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="optimizer"):
        train(tiny_model(), images, labels, masks, quiet(epochs=4, optimizer="adam", lr=1e-3),
              checkpoint_path=sgd_checkpoint, resume=True)


# ----------------------------------------------------------------------------- stale temporary files


CRASH_WHILE_SAVING = textwrap.dedent("""
    import os, sys
    import torch
    from isnet_fast.training import CHECKPOINT_FORMAT, save_checkpoint

    def die_mid_write(obj, file, *args, **kwargs):
        file.write(b"PK\\x03\\x04 half a checkpoint")
        file.flush()
        os._exit(3)  # killed: no except clause, no finally, no cleanup

    torch.save = die_mid_write
    save_checkpoint(sys.argv[1], {"format": CHECKPOINT_FORMAT, "epoch": 2})
""")


def test_the_next_save_removes_temporary_files_left_by_a_crash(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "epoch": 1})
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CRASH_WHILE_SAVING, str(path)], capture_output=True, timeout=300)
        assert done.returncode == 3, done.stderr.decode()[-2000:]
    stale = sorted(p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt")
    assert len(stale) == 2 and all(name.startswith(".checkpoint.pt.") and name.endswith(".tmp") for name in stale)
    assert load_checkpoint(path)["epoch"] == 1  # the crash never touched the checkpoint itself
    others = [tmp_path / ".other.pt.0123456789abcdef0123456789abcdef.tmp", tmp_path / ".checkpoint.pt.notes.tmp",
              tmp_path / "checkpoint.pt.tmp"]
    for other in others:
        other.write_bytes(b"not ours")

    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "epoch": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint.pt"] + [o.name for o in others])
    assert load_checkpoint(path)["epoch"] == 3


def test_a_failed_save_in_process_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"

    def write_half_then_fail(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "epoch": 1})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- explain: image too small


def test_explain_on_an_image_too_small_for_the_network_is_one_clean_line(tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    config = dict(TINY, block_config=[1, 1, 1, 1], drop_rate=0.0, classifier_dropout=None)
    net = DenseNet(**dict(TINY, block_config=(1, 1, 1, 1)))
    path = tmp_path / "four-blocks.pt"
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "state_dict": IsDenseFast(net).state_dict(),
                           "densenet_config": config})
    image = tmp_path / "small.png"
    Image.new("RGB", (16, 16), (120, 30, 200)).save(image)
    assert explain("--checkpoint", path, image, "--out", tmp_path / "out") == 2
    line = one_line_error(capsys)
    assert_short(line, str(image), "16x16", "too small", "29", "--size")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
