"""Half-precision weights for sharing a trained run: they score as the float32 weights do, every
command reads a folder that holds only them, and resuming from them is refused in one line."""
import json
import os
import shutil
import subprocess
import sys

import pyro
import pytest
import torch

from conftest import REPO, SHARED_DATA, tiny_config
from pyro_rnp import load_run
from pyro_rnp.analysis.evaluate import evaluate
from pyro_rnp.training.runs import CHECKPOINT, WEIGHTS, RunError, check_resumable, save_weights


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from pyro_rnp.fit import train
    run_dir = tmp_path_factory.mktemp("export") / "run"
    train(tiny_config(dataset="fashion", limit=64, epochs=1, eval_limit=8), run_dir, torch.device("cpu"),
          SHARED_DATA, download=False, progress=False)
    return run_dir


def command(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=dict(os.environ, PYRO_RNP_DATA=str(SHARED_DATA)))


def test_half_precision_weights_give_the_same_held_out_bound_within_a_tenth_of_a_nat(trained_run, fashion_images):
    model = load_run(trained_run)
    save_weights(trained_run, model)
    halved = load_run(trained_run, weights_only=True)
    payload = torch.load(trained_run / WEIGHTS, weights_only=False)
    assert payload["optimizer"] is None and all(t.dtype == torch.float16 for t in payload["model"].values()
                                                if t.is_floating_point())
    assert all(p.dtype == torch.float32 for p in halved.parameters())          # widened again on loading
    scores = []
    for m in (model, halved):
        pyro.set_rng_seed(0)
        scores.append(evaluate(m, fashion_images[:64])["neg_elbo"])
    assert scores[0] != scores[1] and abs(scores[0] - scores[1]) < 0.1, scores


def test_a_folder_with_only_weights_is_evaluated_and_refuses_to_resume(trained_run, tmp_path):
    shared = tmp_path / "shared-run"
    shutil.copytree(trained_run, shared, ignore=shutil.ignore_patterns(CHECKPOINT))
    save_weights(shared, load_run(trained_run))
    assert not (shared / CHECKPOINT).exists()
    assert isinstance(load_run(shared), torch.nn.Module)
    out = command("pyro_rnp.evaluate", str(shared), "--limit", "8", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    out = command("pyro_rnp.fit", "--resume", str(shared), "--epochs", "2", "--quiet")
    assert out.returncode == 1 and "not resumed" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = command("pyro_rnp.fit", "--dataset", "fashion", "--run-dir", str(shared), "--quiet")
    assert out.returncode == 1 and "already holds a run" in out.stderr, out.stderr


def test_the_export_command_reports_size_and_the_difference(trained_run):
    out = command("pyro_rnp.export", str(trained_run), "--limit", "16", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["megabytes"] < result["checkpoint_megabytes"] / 3 and abs(result["difference_nats"]) < 0.1
    written = json.loads((trained_run / "export.json").read_text())
    assert written["dtype"] == "float16" and written["weights"] == "weights.pt"  # movable with its folder


def test_compressed_weights_are_smaller_and_load_the_same_numbers(trained_run, tmp_path):
    model = load_run(trained_run)
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    for folder, compress in ((plain, False), (packed, True)):
        shutil.copytree(trained_run, folder, ignore=shutil.ignore_patterns(CHECKPOINT))
        save_weights(folder, model, compress=compress)
    assert (packed / WEIGHTS).read_bytes()[:2] == b"\x1f\x8b"                   # gzip, not torch's zip
    assert (packed / WEIGHTS).stat().st_size < 0.97 * (plain / WEIGHTS).stat().st_size
    first, second = load_run(plain), load_run(packed)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    save_weights(tmp_path / "again", model, compress=True)                     # the same weights, the same bytes
    assert (tmp_path / "again" / WEIGHTS).read_bytes() == (packed / WEIGHTS).read_bytes()
    with pytest.raises(RunError, match="not resumed"):
        check_resumable(packed)


def test_weights_that_overflow_half_precision_are_refused(trained_run, tmp_path):
    model = load_run(trained_run)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = 1e6                                # beyond float16's 65,504
    with pytest.raises(RunError, match="overflow"):
        save_weights(tmp_path, model)
    assert not (tmp_path / WEIGHTS).exists()


SHIPPED = sorted(p.parent for p in (REPO / "runs").glob("*/weights.pt"))


@pytest.mark.parametrize("run_dir", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_weights_score_what_their_export_measured(run_dir):
    """A committed run that ships weights.pt loads from the checkout without its checkpoint and scores
    the held-out images of its export check as export.json says: the weights in the repository are
    the ones that were measured."""
    from pyro_rnp.cli import held_out
    from pyro_rnp.export import neg_elbo
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found")
    assert not (run_dir / CHECKPOINT).exists()
    recorded = json.loads((run_dir / "export.json").read_text())
    model = load_run(run_dir)
    images = held_out(model.config, SHARED_DATA, False, recorded["check_images"])[0]  # the images export scored
    score = neg_elbo(model, images, seed=0, device=torch.device("cpu"))  # export's default seed
    assert abs(score - recorded["neg_elbo_weights"]) < 0.05, (score, recorded["neg_elbo_weights"])
