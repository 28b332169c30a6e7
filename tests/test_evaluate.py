"""Held-out evaluation: the ELBO and IWAE estimators, and the evaluate command."""
import json
import subprocess
import sys

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from conftest import REPO, SHARED_DATA, tiny_config
from pyro_rnp import RNP
from pyro_rnp.analysis.evaluate import evaluate, log_weights
from pyro_rnp.fit import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    config = tiny_config(limit=64, epochs=1, eval_limit=16)
    train(config, run_dir, torch.device("cpu"), SHARED_DATA, download=False, progress=False)
    return run_dir


def test_one_sample_estimate_is_pyros_elbo(fashion_images):
    rnp = RNP(tiny_config()).eval()
    x = fashion_images[:6]
    pyro.set_rng_seed(3)
    ours = -log_weights(rnp, x, 1).sum().item()
    pyro.set_rng_seed(3)
    theirs = Trace_ELBO().loss(rnp.model, rnp.guide, x, part_term=False)
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_iwae_with_one_sample_is_the_elbo_and_never_worse_with_more(fashion_images):
    rnp = RNP(tiny_config())
    x, labels = fashion_images[:12], torch.arange(12) % 3
    one = evaluate(rnp, x, labels, iw_samples=1)
    assert one["iwae_nll"] == pytest.approx(one["neg_elbo"], abs=1e-9)
    many = evaluate(rnp, x, labels, iw_samples=20, batch_size=4)  # several particle chunks per batch
    assert many["iwae_nll"] <= many["neg_elbo"]
    assert many["iw_samples"] == 20 and many["n_images"] == 12 and many["likelihood"] == "normal(sigma=0.5)"
    assert set(many["per_class"]) == {0, 1, 2}
    assert sum(c["n_images"] for c in many["per_class"].values()) == 12
    assert many["mse"] == pytest.approx(one["mse"])  # the reconstruction uses the posterior mean


def test_evaluate_command_writes_eval_json(tiny_run):
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.evaluate", str(tiny_run), "--iw-samples", "4",
                          "--limit", "20", "--json", "--data-dir", str(SHARED_DATA), "--no-download"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("neg_elbo", "iwae_nll", "iw_samples", "mse", "likelihood", "n_images"):
        assert key in printed, key
    assert printed["n_images"] == 20 and printed["iw_samples"] == 4
    assert printed["iwae_nll"] <= printed["neg_elbo"]
    assert json.loads((tiny_run / "eval.json").read_text())["iwae_nll"] == printed["iwae_nll"]


@pytest.mark.parametrize("make", ["missing", "foreign"])
def test_evaluate_refuses_what_is_not_a_run(tmp_path, make):
    path = tmp_path / "nothing" if make == "missing" else tmp_path
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.evaluate", str(path)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 1
    assert "not a" in out.stderr and "Traceback" not in out.stderr
