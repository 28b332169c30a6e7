"""Posterior and prior predictive checks."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHARED_DATA, tiny_config
from pyro_rnp import RNP
from pyro_rnp.fit import train
from pyro_rnp.analysis.ppc import p_values, posterior_predictive_check, posterior_replicates, statistics


def test_statistics_of_known_images():
    blank, full = torch.zeros(1, 1, 28, 28), torch.ones(1, 1, 28, 28)
    dot = torch.zeros(1, 1, 28, 28)
    dot[0, 0, 0, 27] = 1.0  # top right corner
    s_full, s_dot = statistics(full), statistics(dot)
    assert s_full["ink_fraction"].item() == 1.0 and statistics(blank)["ink_fraction"].item() == 0.0
    assert s_full["centroid_x"].item() == pytest.approx(0.5) and s_full["centroid_y"].item() == pytest.approx(0.5)
    assert s_dot["centroid_x"].item() == pytest.approx(1.0) and s_dot["centroid_y"].item() == pytest.approx(0.0)
    assert s_full["edge_energy"].item() == 0.0 and s_dot["edge_energy"].item() == pytest.approx(2.0)
    assert s_dot["spread"].item() == pytest.approx(0.0, abs=1e-6) and s_full["spread"].item() > 0.1


def test_p_values_lie_in_the_unit_interval_and_are_one_half_for_replicates_equal_to_the_data():
    observed = torch.randn(50)
    assert torch.equal(p_values(observed, observed.expand(30, 50)), torch.full((50,), 0.5))
    p = p_values(observed, torch.randn(30, 50))
    assert ((p >= 0) & (p <= 1)).all()
    assert torch.equal(p_values(observed, observed.expand(7, 50) + 1), torch.ones(50))


def test_replicates_are_drawn_afresh_from_the_posterior(fashion_images):
    rnp = RNP(tiny_config()).eval()
    x = fashion_images[:3]
    reps = posterior_replicates(rnp, x, 5)
    assert reps.shape == (5, 3, 1, 28, 28)
    assert not torch.equal(reps[0], x) and not torch.equal(reps[0], reps[1])
    result, _, _ = posterior_predictive_check(rnp, fashion_images[:6], samples=4)
    for summary in result["statistics"].values():
        assert 0 <= summary["mean_p_value"] <= 1
        assert 0 <= summary["fraction_data_inside_prior_95"] <= 1


def test_ppc_command_writes_json_and_figures(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(limit=32, epochs=1, eval_limit=8), run_dir, torch.device("cpu"), SHARED_DATA,
          download=False, progress=False)
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.ppc", str(run_dir), "--samples", "5", "--limit", "12",
                          "--json", "--data-dir", str(SHARED_DATA), "--no-download"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert printed == json.loads((run_dir / "ppc.json").read_text())
    assert set(printed["statistics"]) == {"mean_intensity", "ink_fraction", "centroid_x", "centroid_y", "spread",
                                          "edge_energy"}
    for summary in printed["statistics"].values():
        assert {"mean_p_value", "fraction_p_below_0.05", "fraction_p_above_0.95"} <= set(summary)
    for name in ("ppc_replicates.png", "ppc_statistics.png"):
        assert (run_dir / "figures" / name).stat().st_size > 1000


def test_ppc_refuses_a_foreign_folder(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.ppc", str(tmp_path)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 1 and "not a pyro_rnp run folder" in out.stderr and "Traceback" not in out.stderr
