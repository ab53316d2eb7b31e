"""``isnet-fast demo``: the --quick smoke run writes the grid, the results and the checkpoints."""

import argparse
import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from isnet_fast.demo import DEFAULT_SETTINGS, QUICK_SETTINGS, add_demo_parser, format_results, run_demo  # noqa: E402
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
    assert (out / "heatmaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_results(results)
    assert "plain DenseNet" in table and "ISNet (P=" in table and "epsilon rule" in table

    # The demo's checkpoints are ready for `explain` (architecture and image size recorded).
    args = parse("explain", "--checkpoint", out / "isnet.pt", out / "heatmaps.png", "--out", tmp_path / "explained")
    assert run_explain(args) == 0
    assert len(list((tmp_path / "explained").glob("heatmaps_class*.png"))) == 1


def test_defaults_and_overrides():
    args = parse("demo")
    assert args.out == "isnet-demo" and args.epochs is None and args.seed == 0 and args.device == "cpu"
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
