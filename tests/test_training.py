"""Training helpers: the compound loss, the loop and its logs, atomic checkpoints, exact resume."""

import json
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from isnet_fast import DenseNet, IsDenseFast, heatmap_loss
from isnet_fast.training import (CHECKPOINT_FORMAT, TrainConfig, build_densenet, compound_loss, densenet_config,
                                 evaluate, load_checkpoint, save_checkpoint, scheduled_lr, train)

TINY = dict(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2, num_classes=3)


def tiny_model(seed=0, **overrides):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IsDenseFast(DenseNet(**dict(TINY, **overrides)))


def toy_data(n=12, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=generator)
    labels = torch.randint(0, 3, (n,), generator=generator)
    masks = torch.zeros(n, 3, size, size)
    masks[..., 8:24, 8:24] = 1
    return images, labels, masks


def quiet(**overrides):
    return TrainConfig(**dict(dict(epochs=1, batch_size=4, P=0.5, optimizer="sgd", lr=0.01, progress=False),
                              **overrides))


# ----------------------------------------------------------------------------- loss


def test_compound_loss_is_the_weighted_sum():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=generator)
    heatmaps = torch.randn(4, 3, 3, 16, 16, generator=generator)
    labels = torch.tensor([0, 2, 1, 2])
    masks = torch.zeros(4, 3, 16, 16)
    masks[..., 4:12, 4:12] = 1
    kwargs = dict(cut=0.5, cut2=10, E=2, d=0.8)
    losses = compound_loss(logits, heatmaps, labels, masks, P=0.7, **kwargs)
    classification = F.cross_entropy(logits, labels)
    heat = heatmap_loss(heatmaps, masks, **kwargs)
    assert torch.allclose(losses["loss"], 0.3 * classification + 0.7 * heat, rtol=1e-6)
    assert torch.equal(losses["classification"], classification) and torch.equal(losses["heatmap"], heat)


def test_compound_loss_multilabel_uses_bce_and_p0_needs_no_heatmaps():
    logits = torch.randn(4, 3)
    targets = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=torch.float32)
    losses = compound_loss(logits, None, targets, None, P=0, multilabel=True)
    assert torch.allclose(losses["loss"], F.binary_cross_entropy_with_logits(logits, targets))
    assert losses["heatmap"].item() == 0
    with pytest.raises(ValueError, match="heatmaps"):
        compound_loss(logits, None, targets, None, P=0.5, multilabel=True)


# ----------------------------------------------------------------------------- loop


def test_an_epoch_runs_and_logs(tmp_path):
    images, labels, masks = toy_data()
    model = tiny_model()
    log = tmp_path / "log.jsonl"
    seen = []
    history = train(model, images, labels, masks, quiet(epochs=2), log_path=log, on_epoch_end=seen.append,
                    validation={"images": images, "labels": labels})
    assert len(history) == 2 and seen == history
    for record in history:
        assert set(record) >= {"epoch", "loss", "classification_loss", "heatmap_loss", "accuracy", "lr",
                               "seconds", "val_accuracy"}
        assert all(v == v and abs(v) < float("inf") for v in record.values())  # finite
        assert record["heatmap_loss"] > 0
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]
    assert model.heat is True and model.training


def test_training_lowers_the_loss_on_a_learnable_task():
    # Class = which third of the image is bright: learnable in a few steps.
    images, labels, masks = toy_data(n=24)
    images = images * 0.1
    for i, label in enumerate(labels.tolist()):
        images[i, :, :, label * 10:label * 10 + 10] += 0.9
    history = train(tiny_model(), images, labels, masks, quiet(epochs=6, P=0.0, optimizer="adam", lr=0.02))
    assert history[-1]["loss"] < history[0]["loss"]


def test_p0_trains_without_heatmaps_and_plain_models_are_accepted():
    images, labels, masks = toy_data()
    model = tiny_model()
    calls = []
    model.DenseNet.register_forward_hook(lambda *_: calls.append(model.heat))
    history = train(model, images, labels, None, quiet(P=0.0))
    assert history[0]["heatmap_loss"] == 0 and calls and not any(calls)  # heat was off while training
    assert model.heat is True  # and restored
    train(DenseNet(**TINY), images, labels, None, quiet(P=0.0))
    with pytest.raises(TypeError, match="IsDenseFast"):
        train(DenseNet(**TINY), images, labels, masks, quiet(P=0.5))


def test_progress_falls_back_to_log_lines_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    images, labels, masks = toy_data()
    train(tiny_model(), images, labels, masks, quiet(progress=True, log_every=2))
    err = capsys.readouterr().err
    assert "epoch 1/1: batch 2/3" in err and "batch 3/3" in err


def test_cosine_schedule_falls_from_lr_to_zero():
    config = TrainConfig(lr=0.1, lr_schedule="cosine")
    assert scheduled_lr(config, 0, 100) == pytest.approx(0.1)
    assert scheduled_lr(config, 50, 100) == pytest.approx(0.05)
    assert scheduled_lr(config, 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert scheduled_lr(TrainConfig(lr=0.1), 99, 100) == 0.1


def test_evaluate_restores_the_mode_and_heat():
    images, labels, _ = toy_data()
    model = tiny_model().train()
    accuracy = evaluate(model, images, labels, batch_size=5)
    assert 0 <= accuracy <= 1 and model.training and model.heat
    model.eval()
    with torch.no_grad():
        expected = (model(images)[0].argmax(1) == labels).float().mean().item()
    assert evaluate(model, images, labels) == pytest.approx(expected)
    assert evaluate(model.DenseNet, images, labels) == pytest.approx(expected)


def test_densenet_config_rebuilds_the_same_shapes():
    net = DenseNet(**TINY)
    net.classifier = nn.Sequential(nn.Dropout(0.2), net.classifier)
    config = densenet_config(IsDenseFast(net))
    assert config == dict(TINY, block_config=[1, 1], drop_rate=0.0, classifier_dropout=0.2)
    rebuilt = build_densenet(config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


# ----------------------------------------------------------------------------- checkpoints


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "epoch": 1, "weights": torch.arange(4.0)})
    real_save = torch.save

    def save_half_then_crash(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        file.flush()
        raise RuntimeError("simulated crash mid-write")

    monkeypatch.setattr(torch, "save", save_half_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "epoch": 2, "weights": torch.zeros(4)})
    monkeypatch.setattr(torch, "save", real_save)
    survivor = load_checkpoint(path)
    assert survivor["epoch"] == 1 and torch.equal(survivor["weights"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"], "no temporary file is left behind"
    plain_file = tmp_path / "run" / "plain"
    plain_file.write_bytes(b"")
    assert path.stat().st_mode == plain_file.stat().st_mode, "the usual permissions, not a temporary file's"


def test_a_crash_during_training_leaves_the_last_epoch_loadable(tmp_path, monkeypatch):
    images, labels, masks = toy_data()
    path = tmp_path / "checkpoint.pt"
    train(tiny_model(), images, labels, masks, quiet(epochs=1), checkpoint_path=path)

    def crash(obj, file, *args, **kwargs):
        file.write(b"garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_model(), images, labels, masks, quiet(epochs=2), checkpoint_path=path, resume=True)
    monkeypatch.undo()
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == 1 and len(checkpoint["history"]) == 1
    # ... and it is still a checkpoint IsDenseFast reads directly
    IsDenseFast.from_checkpoint(path, DenseNet(**TINY))


@pytest.mark.parametrize("optimizer, schedule", [("sgd", "constant"), ("adam", "cosine")])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, optimizer, schedule):
    images, labels, masks = toy_data(n=10)
    config = quiet(epochs=2, optimizer=optimizer, lr=0.01 if optimizer == "sgd" else 1e-3, momentum=0.9,
                   lr_schedule=schedule)

    uninterrupted = tiny_model()
    history = train(uninterrupted, images, labels, masks, config)

    class Interrupted(Exception):
        pass

    def interrupt_after_the_first_epoch(record):
        if record["epoch"] == 1:
            raise Interrupted

    path = tmp_path / "checkpoint.pt"
    with pytest.raises(Interrupted):  # the run stops after epoch 1 (its checkpoint is written first)
        train(tiny_model(), images, labels, masks, config, checkpoint_path=path,
              on_epoch_end=interrupt_after_the_first_epoch)
    assert load_checkpoint(path)["epoch"] == 1
    resumed = tiny_model(seed=123)  # other initial weights: all must come from the checkpoint
    resumed_history = train(resumed, images, labels, masks, config, checkpoint_path=path, resume=True)

    for (key, ours), theirs in zip(resumed.state_dict().items(), uninterrupted.state_dict().values()):
        assert torch.equal(ours, theirs), key
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert strip(resumed_history) == strip(history)
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == 2 and checkpoint["densenet_config"]["block_config"] == [1, 1]
    assert checkpoint["image_size"] == [32, 32] and checkpoint["train_config"]["optimizer"] == optimizer


def test_resume_without_a_checkpoint_starts_afresh(tmp_path):
    images, labels, masks = toy_data()
    history = train(tiny_model(), images, labels, masks, quiet(), checkpoint_path=tmp_path / "none.pt", resume=True)
    assert [r["epoch"] for r in history] == [1]


def test_bad_settings_and_foreign_checkpoints_are_refused(tmp_path):
    with pytest.raises(ValueError, match="P must be"):
        TrainConfig(P=1.5)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    foreign = tmp_path / "weights.pt"
    torch.save({"classifier.weight": torch.zeros(3, 2)}, foreign)
    with pytest.raises(ValueError, match="not an isnet-fast training checkpoint"):
        load_checkpoint(foreign)
