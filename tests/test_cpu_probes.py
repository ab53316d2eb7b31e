"""``bench/cpu_probes.py``: the stabiliser probe compares the two versions bit for bit."""

import pytest
import torch

from helpers import load_bench_script


def load_script():
    return load_bench_script("cpu_probes.py", "cpu_probes")


def test_the_stabiliser_probe_times_both_versions_on_zeros_of_both_signs(capsys):
    totals = load_script().stabiliser(repeat=1, shapes=[(2, 3, 4, 5), (1, 7, 3, 2)])
    assert set(totals) == {"select", "sign"} and all(t > 0 for t in totals.values())
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[-1].strip().startswith("all:")


def test_the_select_version_is_the_stabiliser_it_replaced():
    probes = load_script()
    z = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf")])
    assert torch.equal(probes.stabilized_by_select(z, 0.5), torch.tensor([0.5, 0.5, 1.5, -1.5, float("inf"), -float("inf")]))


def test_an_unknown_probe_is_refused(capsys):
    with pytest.raises(SystemExit):
        load_script().main(["nothing"])
    assert "invalid choice" in capsys.readouterr().err
