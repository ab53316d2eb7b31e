"""``isnet-fast explain``: heatmap PNGs from our checkpoints and the original's, and one-line errors."""

import argparse

import pytest
import torch

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from isnet_fast import DenseNet, IsDenseFast, densenet121  # noqa: E402
from isnet_fast.explain import add_explain_parser, relevance_inside_mask  # noqa: E402
from isnet_fast.training import TrainConfig, train  # noqa: E402

TINY = dict(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2, num_classes=3)


def explain(*argv):
    parser = argparse.ArgumentParser(prog="isnet-fast")
    add_explain_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["explain", *map(str, argv)])
    return args.handler(args, args.subparser)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    paths = []
    for name, size, mode in (("cat.png", (50, 40), "RGB"), ("grey.jpg", (32, 32), "L")):
        pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
        image = Image.fromarray(pixels).convert(mode)
        image.save(folder / name)
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="module")
def our_checkpoint(tmp_path_factory):
    """A checkpoint written by the training loop: it records the DenseNet config and the image size."""
    path = tmp_path_factory.mktemp("run") / "isnet.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = IsDenseFast(DenseNet(**TINY), e=0.05, Zb=False)
    images = torch.rand(6, 3, 32, 32)
    masks = torch.ones(6, 3, 32, 32)
    train(model, images, torch.tensor([0, 1, 2, 0, 1, 2]), masks,
          TrainConfig(epochs=1, batch_size=6, P=0.5, progress=False), checkpoint_path=path)
    return path


@pytest.fixture(scope="module")
def original_checkpoint(tmp_path_factory):
    """An original-style IsDense checkpoint: ``DenseNet.*`` keys plus the LRP block's aliases, Lightning-wrapped."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = densenet121(num_classes=2)
    state = {f"model.DenseNet.{key}": value for key, value in net.state_dict().items()}
    state["model.LRPBlock.LRPInput.layer.weight"] = net.features.conv0.weight
    state["model.LRPBlock.LRPDense.layer.weight"] = net.classifier.weight
    path = tmp_path_factory.mktemp("original") / "isnet-lightning.ckpt"
    torch.save({"state_dict": state, "epoch": 12}, path)
    return path


def test_top_class_heatmaps_from_our_checkpoint(tmp_path, images, our_checkpoint, capsys):
    assert explain("--checkpoint", our_checkpoint, *images, "--out", tmp_path) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 2 and written[0].startswith("cat_class") and written[1].startswith("grey_class")
    out = capsys.readouterr().out
    assert "cat.png: top class" in out and "grey.jpg: top class" in out
    # LRP settings as the checkpoint was trained (e=0.05, epsilon rule at the input), at its image size
    assert "e=0.05 and the epsilon rule at the input; 3 classes; images at (32, 32)" in out
    with Image.open(tmp_path / written[0]) as png:
        assert png.format == "PNG" and png.size[0] > 100


def test_all_classes_one_class_and_options(tmp_path, images, our_checkpoint, capsys):
    assert explain("--checkpoint", our_checkpoint, images[0], "--out", tmp_path / "all", "--all-classes",
                   "--e", "0.1", "--no-zb", "--size", "40x48") == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [f"cat_class{k}.png" for k in range(3)]
    assert explain("--checkpoint", our_checkpoint, images[0], "--out", tmp_path / "one", "--class", "2",
                   "--zb") == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["cat_class2.png"]
    assert "e=0.05 and the z^B rule" in capsys.readouterr().out


@pytest.mark.parametrize("variant", [dict(explain="random"), dict(explain="lowest", selective=True)])
def test_checkpoints_of_the_one_map_variants_explain_every_class(tmp_path, images, variant, capsys):
    """A Stochastic or Selective ISNet's checkpoint records its variant; ``explain`` still draws the
    logit heatmap of any class (the trained variant makes one map per image)."""
    path = tmp_path / "variant.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = IsDenseFast(DenseNet(**TINY), Zb=False, **variant)
        train(model, torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2]), torch.ones(6, 3, 32, 32),
              TrainConfig(epochs=1, batch_size=6, P=0.5, progress=False), checkpoint_path=path)
    assert torch.load(path, weights_only=True)["isdensefast"]["explain"] == variant["explain"]
    assert explain("--checkpoint", path, images[0], "--out", tmp_path / "all", "--all-classes") == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [f"cat_class{k}.png" for k in range(3)]
    assert explain("--checkpoint", path, images[0], "--out", tmp_path / "top") == 0
    assert len(list((tmp_path / "top").iterdir())) == 1
    assert "epsilon rule at the input; 3 classes" in capsys.readouterr().out


def test_original_style_checkpoint_with_arch(tmp_path, images, original_checkpoint, capsys):
    assert explain("--checkpoint", original_checkpoint, images[1], "--out", tmp_path, "--arch", "densenet121",
                   "--size", "32") == 0
    assert len(list(tmp_path.glob("grey_class*.png"))) == 1
    out = capsys.readouterr().out
    assert "top class" in out and "e=0.01 and the z^B rule at the input; 2 classes; images at (32, 32)" in out


def one_line_error(capsys):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isnet-fast explain: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_original_checkpoint_without_arch_says_which_to_pass(tmp_path, images, original_checkpoint, capsys):
    assert explain("--checkpoint", original_checkpoint, images[0], "--out", tmp_path) == 2
    message = one_line_error(capsys)
    assert "does not record its architecture" in message and "--arch densenet121 --classes 2" in message


@pytest.mark.parametrize("options, expected", [
    (["--arch", "densenet169"], "features.denseblock3.denselayer25"),
    (["--arch", "densenet121", "--classes", "5"], "classifier.weight: checkpoint (2, 1024) vs model (5, 1024)"),
])
def test_mismatched_checkpoint_names_the_keys_and_the_fix(tmp_path, images, original_checkpoint, capsys,
                                                         options, expected):
    assert explain("--checkpoint", original_checkpoint, images[0], "--out", tmp_path, *options) == 2
    message = one_line_error(capsys)
    assert expected in message and "its weights fit --arch densenet121 --classes 2" in message
    assert not list(tmp_path.iterdir())


def test_our_checkpoint_with_other_classes_or_an_arch_is_refused(tmp_path, images, our_checkpoint, capsys):
    assert explain("--checkpoint", our_checkpoint, images[0], "--out", tmp_path, "--classes", "4") == 2
    assert "classifier.weight: checkpoint (3, 10) vs model (4, 10)" in one_line_error(capsys)
    assert explain("--checkpoint", our_checkpoint, images[0], "--out", tmp_path, "--arch", "densenet121") == 2
    assert "the checkpoint records its architecture: leave out --arch" in one_line_error(capsys)


def test_bad_images_fail_before_any_output(tmp_path, images, our_checkpoint, capsys):
    missing = tmp_path / "missing.png"
    assert explain("--checkpoint", our_checkpoint, images[0], missing, "--out", tmp_path / "out") == 2
    assert f"image {missing} does not exist" in one_line_error(capsys)
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    assert explain("--checkpoint", our_checkpoint, fake, "--out", tmp_path / "out") == 2
    assert f"cannot read image {fake}" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_bad_checkpoints_and_class_index(tmp_path, images, our_checkpoint, capsys):
    assert explain("--checkpoint", tmp_path / "nope.pt", images[0], "--out", tmp_path) == 2
    assert "does not exist" in one_line_error(capsys)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    assert explain("--checkpoint", garbage, images[0], "--out", tmp_path) == 2
    assert f"cannot read checkpoint {garbage}" in one_line_error(capsys)
    assert explain("--checkpoint", our_checkpoint, images[0], "--out", tmp_path, "--class", "3") == 2
    assert "--class 3 is out of range: the model has 3 classes" in one_line_error(capsys)


def test_options_are_validated_by_the_parser(images, our_checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        explain("--checkpoint", our_checkpoint, images[0], "--class", "1", "--all-classes")
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        explain("--checkpoint", our_checkpoint, images[0], "--size", "0")
    capsys.readouterr()


def test_relevance_inside_mask_counts_positive_relevance_only():
    heatmaps = torch.zeros(2, 3, 4, 4)
    heatmaps[0, 0, 0, 0] = 3.0  # inside
    heatmaps[0, 1, 3, 3] = 1.0  # outside
    heatmaps[0, 2, 2, 2] = -5.0  # negative: ignored
    masks = torch.zeros(2, 3, 4, 4)
    masks[:, :, :2, :2] = 1
    assert relevance_inside_mask(heatmaps, masks).tolist() == [0.75, 0.0]
