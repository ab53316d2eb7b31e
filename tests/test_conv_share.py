"""``bench/conv_share.py``: it records every convolution of a train step (one transposed
convolution per convolution, each with its backward) and replays them alone."""

import pytest
import torch
import torch.nn as nn

from helpers import load_bench_script
from isnet_fast.benchmark import CaseSpec, prepare_case


def load_script():
    return load_bench_script("conv_share.py", "conv_share")


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_a_train_step_records_one_transposed_convolution_per_convolution_and_their_backward(arch):
    conv_share = load_script()
    case = prepare_case(CaseSpec(case="train", implementation="isnet_fast", arch=arch, batch=2, classes=2,
                                 size=64, threads=1))
    calls = conv_share.record_step_convolutions(case)
    forward = [args for func, args in calls if func is torch.ops.aten.convolution.default]
    backward = [args for func, args in calls if func is torch.ops.aten.convolution_backward.default]
    transposed = [args for args in forward if args[6]]
    convolutions = sum(isinstance(m, nn.Conv2d) for m in case.model.modules())
    assert len(transposed) == convolutions
    # the model's convolutions, and the z^B rule's one on the pixel bounds (the stem)
    assert len(forward) - len(transposed) == convolutions + 1
    assert len(backward) == len(forward)
    batch_of_maps = [args[0].shape[0] for args in transposed]
    assert set(batch_of_maps) == {2 * 2}  # the 2 maps of the 2 images in one batch, never copied per class
    conv_share.replay(conv_share.materialise(calls))  # runs on random tensors of the recorded layouts


def test_the_script_prints_the_step_and_the_convolutions_share(capsys):
    threads = torch.get_num_threads()
    try:
        load_script().main(["--arch", "resnet18", "--size", "64", "--classes", "2", "--repeat", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # main sets the process's threads
    lines = capsys.readouterr().out.splitlines()
    assert "convolution calls per step" in lines[0]
    assert lines[1].startswith("train step") and lines[2].startswith("convolutions") and lines[2].endswith("of the step")
