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
    masks[..., size // 4:3 * size // 4, size // 4:3 * size // 4] = 1  # the central square
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


# ----------------------------------------------------------------------------- ISNet variants

import isnet_fast.training as training_module  # noqa: E402
from isnet_fast.training import isdensefast_settings, load_model  # noqa: E402

VARIANTS = [("all", False), ("top", False), ("lowest", False), ("random", False), ("sum", False),
            ("lowest", True), ("all", True), ("random", True)]


def spy_on_heatmap_loss(monkeypatch):
    """Records the heatmaps the training loop hands to the heatmap loss."""
    seen = []

    def recording(heatmaps, masks, **kwargs):
        seen.append((heatmaps.detach().clone(), kwargs))
        return heatmap_loss(heatmaps, masks, **kwargs)

    monkeypatch.setattr(training_module, "heatmap_loss", recording)
    return seen


@pytest.mark.parametrize("explain, selective", VARIANTS)
def test_every_variant_trains(monkeypatch, explain, selective):
    images, labels, masks = toy_data()
    model = tiny_model()
    model.explain, model.selective = explain, selective
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = spy_on_heatmap_loss(monkeypatch)
    history = train(model, images, labels, masks, quiet())
    record = history[0]
    assert all(v == v and abs(v) < float("inf") for v in record.values())
    assert record["heatmap_loss"] > 0
    assert len(seen) == 3  # 12 images, batches of 4
    assert {tuple(h.shape) for h, _ in seen} == {(4, 3 if explain == "all" else 1, 3, 32, 32)}
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (model.explain, model.selective) == (explain, selective)  # left as it was


def test_heatmap_loss_kwargs_pass_through(monkeypatch):
    images, labels, masks = toy_data()
    seen = spy_on_heatmap_loss(monkeypatch)
    options = dict(norm="RoIMean", alternativeForeground="hybrid", cut=0.5)
    train(tiny_model(), images, labels, masks, quiet(heatmap_loss_kwargs=options))
    assert seen and all(kwargs == options for _, kwargs in seen)


def test_explain_labels_explains_each_images_label(monkeypatch):
    images, labels, masks = toy_data()
    model = tiny_model()
    model.explain = "top"  # explain_labels overrides it
    calls = []
    real_forward = model.forward

    def forward(x, classes=None):
        calls.append((x.clone(), classes))
        return real_forward(x, classes)

    monkeypatch.setattr(model, "forward", forward)
    seen = spy_on_heatmap_loss(monkeypatch)
    train(model, images, labels, masks, quiet(explain_labels=True, lr=0.0, momentum=0.0))
    assert len(calls) == 3 and all(classes is not None for _, classes in calls)
    for x, classes in calls:  # each batch's classes are its images' labels
        index = [next(i for i in range(len(images)) if torch.equal(images[i], image)) for image in x]
        assert torch.equal(classes, labels[index])
    assert {tuple(h.shape[:2]) for h, _ in seen} == {(4, 1)}
    # With lr 0 the weights stay, so the first batch's maps are those of the labels' logits.
    model.train()
    x, classes = calls[0]
    for h, _ in seen[:1]:
        expected = real_forward(x, classes)[1]
        assert torch.allclose(h, expected, atol=1e-6)
        assert not torch.allclose(h, real_forward(x, (classes + 1) % 3)[1], atol=1e-6)


def test_explain_labels_refuses_multilabel_and_is_off_by_default():
    assert TrainConfig().explain_labels is False
    with pytest.raises(ValueError, match="explain_labels.*multilabel"):
        TrainConfig(explain_labels=True, multilabel=True)
    images, labels, masks = toy_data()
    with pytest.raises(ValueError, match="one class index per image"):
        train(tiny_model(), images, labels.float(), masks, quiet(explain_labels=True))
    train(tiny_model(), images, labels, None, quiet(explain_labels=True, P=0.0))  # no maps, nothing to explain


def test_checkpoints_record_the_variant_and_load_model_rebuilds_it(tmp_path):
    images, labels, masks = toy_data()
    path = tmp_path / "selective.pt"
    model = IsDenseFast(DenseNet(**TINY), e=0.05, Zb=False, explain="lowest", selective=True)
    train(model, images, labels, masks, quiet(), checkpoint_path=path)
    checkpoint = load_checkpoint(path)
    assert checkpoint["isdensefast"] == {"e": 0.05, "Zb": False, "reference_pairing": True, "reference_quirks": True,
                                         "explain": "lowest", "selective": True}
    assert checkpoint["train_config"]["explain_labels"] is False
    assert isdensefast_settings(checkpoint) == checkpoint["isdensefast"]

    loaded = load_model(path)
    assert (loaded.explain, loaded.selective, loaded.e, loaded.Zb) == ("lowest", True, 0.05, False)
    assert not loaded.training
    model.eval()
    with torch.no_grad():
        y, R = loaded(images[:2])
        assert R.shape == (2, 1, 3, 32, 32)
        assert torch.equal(y, model(images[:2])[0]) and torch.allclose(R, model(images[:2])[1])
    assert load_model(path, explain="all").maps_per_image == 3  # overrides
    # IsDenseFast.from_checkpoint with the recorded settings
    again = IsDenseFast.from_checkpoint(path, DenseNet(**TINY), **isdensefast_settings(checkpoint))
    assert (again.explain, again.selective) == ("lowest", True)


def test_old_checkpoints_without_the_variant_load_as_the_original_isnet(tmp_path):
    images, labels, masks = toy_data()
    path = tmp_path / "old.pt"
    model = tiny_model()
    model.explain = "top"
    train(model, images, labels, masks, quiet(), checkpoint_path=path)
    checkpoint = load_checkpoint(path)
    for key in ("explain", "selective"):  # as written before the variants existed
        del checkpoint["isdensefast"][key]
    save_checkpoint(path, checkpoint)
    assert isdensefast_settings(load_checkpoint(path))["explain"] == "all"
    loaded = load_model(path)
    assert (loaded.explain, loaded.selective) == ("all", False)
    del checkpoint["isdensefast"]
    save_checkpoint(path, checkpoint)
    assert (load_model(path).explain, isdensefast_settings(load_checkpoint(path))["selective"]) == ("all", False)
    # resuming it takes the old checkpoint's variant: the Original ISNet's
    checkpoint["isdensefast"] = {"e": 1e-2, "Zb": True, "reference_pairing": True}
    save_checkpoint(path, checkpoint)
    resumed = tiny_model()
    resumed.explain = "top"
    with pytest.warns(UserWarning, match="explain='all'"):
        train(resumed, images, labels, masks, quiet(epochs=2), checkpoint_path=path, resume=True)
    assert resumed.explain == "all"


def _interrupted_and_resumed(tmp_path, make_model, images, labels, masks, config):
    class Interrupted(Exception):
        pass

    def interrupt_after_the_first_epoch(record):
        if record["epoch"] == 1:
            raise Interrupted

    path = tmp_path / "checkpoint.pt"
    with pytest.raises(Interrupted):
        train(make_model(), images, labels, masks, config, checkpoint_path=path,
              on_epoch_end=interrupt_after_the_first_epoch)
    torch.manual_seed(1)  # whatever ran in between (other draws than epoch 2's): the checkpoint's RNG state must win
    resumed = make_model(seed=123, explain="all")  # other weights and variant: both come from the checkpoint
    with pytest.warns(UserWarning, match="explain='random'"):
        history = train(resumed, images, labels, masks, config, checkpoint_path=path, resume=True)
    return resumed, history


@pytest.mark.parametrize("own_generator", [False, True])
def test_resume_of_the_stochastic_isnet_is_exact(tmp_path, own_generator):
    images, labels, masks = toy_data(n=12)
    config = quiet(epochs=2, lr=0.05)

    def make_model(seed=0, explain="random"):
        model = tiny_model(seed)
        model.explain = explain
        if own_generator:
            model.generator = torch.Generator().manual_seed(seed)
        return model

    def uninterrupted(global_seed):
        torch.manual_seed(global_seed)
        model = make_model()
        return model, train(model, images, labels, masks, config)

    torch.manual_seed(0)
    reference, history = uninterrupted(0)
    torch.manual_seed(0)
    resumed, resumed_history = _interrupted_and_resumed(tmp_path, make_model, images, labels, masks, config)
    assert resumed.explain == "random"
    for (key, ours), theirs in zip(resumed.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), key
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert strip(resumed_history) == strip(history)

    # The draws matter: other draws (another seed of the generator they come from) train other weights.
    if own_generator:
        other = make_model()
        other.generator.manual_seed(1)
        train(other, images, labels, masks, config)
    else:
        other, _ = uninterrupted(1)
    assert any(not torch.equal(a, b) for a, b in zip(other.state_dict().values(), reference.state_dict().values()))
