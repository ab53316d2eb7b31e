"""``isnet-fast demo``: the --quick smoke run writes the grid, the results and the checkpoints."""

import argparse
import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import torch  # noqa: E402

from isnet_fast import DenseNet, IsDenseFast  # noqa: E402
from isnet_fast.demo import (DEFAULT_SETTINGS, ISNET_VARIANTS, QUICK_SETTINGS, _top_class_heatmaps,  # noqa: E402
                             add_demo_parser, format_results, run_demo)
from isnet_fast.training import load_checkpoint  # noqa: E402
from isnet_fast.explain import run_explain, add_explain_parser  # noqa: E402


def parse(*argv):
    parser = argparse.ArgumentParser(prog="isnet-fast")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(subparsers)
    add_explain_parser(subparsers)
    return parser.parse_args([str(a) for a in argv])


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    args = parse("demo", "--quick", "--out", out, "--seed", "1", "--no-progress")
    assert args.handler(args, args.subparser) == 0
    printed = capsys.readouterr()
    assert "plain DenseNet" in printed.out and "ISNet (P=" in printed.out and "heatmaps.png" in printed.out
    assert "plain epoch 1" in printed.err and "isnet epoch 1" in printed.err

    results = json.loads((out / "results.json").read_text())
    for model in ("plain", "isnet"):
        assert set(results["accuracy"][model]) == {"biased", "no_marker", "shuffled"}
        assert all(0 <= v <= 1 for v in results["accuracy"][model].values())
        for rule in ("epsilon", "zb"):
            assert set(results["relevance_inside_mask"][rule][model]) == {"biased", "shuffled"}
            assert all(0 <= v <= 1 for v in results["relevance_inside_mask"][rule][model].values())
        assert len((out / f"{model}-log.jsonl").read_text().splitlines()) == QUICK_SETTINGS.epochs
    assert results["seed"] == 1 and results["settings"]["epochs"] == QUICK_SETTINGS.epochs
    # the default run is today's: the plain model and the Original ISNet, under their old names
    assert results["variants"] == ["original"] and list(results["models"]) == ["plain", "isnet"]
    assert results["models"]["isnet"] == {"variant": "original", "P": QUICK_SETTINGS.P, "explain": "all",
                                          "selective": False}
    assert set(results["seconds_per_epoch"]) == {"plain", "isnet"}
    assert all(v > 0 for v in results["seconds_per_epoch"].values())
    assert (out / "heatmaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_results(results)
    assert "plain DenseNet" in table and "ISNet (P=" in table and "epsilon rule" in table

    # The demo's checkpoints are ready for `explain` (architecture and image size recorded).
    args = parse("explain", "--checkpoint", out / "isnet.pt", out / "heatmaps.png", "--out", tmp_path / "explained")
    assert run_explain(args) == 0
    assert len(list((tmp_path / "explained").glob("heatmaps_class*.png"))) == 1


def test_several_variants_train_one_isnet_each(tmp_path, capsys):
    out = tmp_path / "demo"
    args = parse("demo", "--quick", "--out", out, "--no-progress", "--variant", "selective", "stochastic",
                 "selective")
    assert args.handler(args, args.subparser) == 0
    printed = capsys.readouterr()
    assert "isnet-selective epoch 1" in printed.err and "isnet-stochastic epoch 1" in printed.err
    assert "isnet epoch 1" not in printed.err  # no Original ISNet was asked for
    results = json.loads((out / "results.json").read_text())
    assert results["variants"] == ["selective", "stochastic"]  # once each, in order
    names = ["plain", "isnet-selective", "isnet-stochastic"]
    assert list(results["models"]) == names and list(results["seconds_per_epoch"]) == names
    assert results["models"]["isnet-selective"]["variant"] == "selective"
    assert results["models"]["plain"] == {"variant": "plain", "P": 0.0, "explain": None, "selective": None}
    for name in names:
        assert all(0 <= v <= 1 for v in results["accuracy"][name].values())
        assert all(0 <= v <= 1 for v in results["relevance_inside_mask"]["epsilon"][name].values())
        assert results["seconds_per_epoch"][name] > 0
    # each ISNet trained as its variant: the checkpoints record it, for load_model and resume
    for variant in ("selective", "stochastic"):
        recorded = load_checkpoint(out / f"isnet-{variant}.pt")["isdensefast"]
        assert {k: recorded[k] for k in ("explain", "selective")} == ISNET_VARIANTS[variant]
    rows = [line.split() for line in format_results(results).splitlines()[2:5]]
    assert [row[:3] for row in rows] == [["plain", "DenseNet", "-"], ["ISNet", f"(P={QUICK_SETTINGS.P:g})", "selective"],
                                         ["ISNet", f"(P={QUICK_SETTINGS.P:g})", "stochastic"]]
    assert float(rows[2][-1]) == pytest.approx(results["seconds_per_epoch"]["isnet-stochastic"], abs=0.01)
    assert "s/epoch" in printed.out and "stochastic" in printed.out


def test_relevance_is_scored_on_the_top_class_for_every_variant():
    torch.manual_seed(0)
    net = DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2, num_classes=4)
    images = torch.rand(5, 3, 32, 32)
    original = IsDenseFast(net, Zb=False).eval()
    with torch.no_grad():
        logits, maps = original(images)
    top = logits.argmax(1)
    expected = maps[torch.arange(5), top]
    for variant in ISNET_VARIANTS.values():
        model = IsDenseFast(net, Zb=False, **variant).eval()
        predictions, heatmaps = _top_class_heatmaps(model, images, batch_size=2)
        assert torch.equal(predictions, top)
        assert torch.allclose(heatmaps, expected, rtol=1e-5, atol=1e-7)
        assert {"explain": model.explain, "selective": model.selective} == variant  # restored
    lowest = maps[torch.arange(5), logits.argmin(1)]
    assert not torch.allclose(heatmaps, lowest)  # what a selective model would make by itself differs


def test_defaults_and_overrides():
    args = parse("demo")
    assert args.out == "isnet-demo" and args.epochs is None and args.seed == 0 and args.device == "cpu"
    assert args.variants == ["original"]
    with pytest.raises(SystemExit):
        parse("demo", "--variant", "dual")
    assert not args.quick and args.handler is run_demo
    assert 0 < DEFAULT_SETTINGS.P <= 1 and DEFAULT_SETTINGS.epochs > QUICK_SETTINGS.epochs
    with pytest.raises(SystemExit):
        parse("demo", "--epochs", "0")


def test_unavailable_device_exits_2(tmp_path, capsys):
    args = parse("demo", "--quick", "--out", tmp_path, "--device", "cuda:7")
    import torch

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert run_demo(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("isnet-fast demo: error: ") and len(err.splitlines()) == 1
