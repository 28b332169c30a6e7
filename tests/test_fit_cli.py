"""The training command as a user runs it: run folders, checkpoints, resume, Ctrl-C, and clear errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, SHARED_DATA
from pyro_rnp import load_run
from pyro_rnp.training.runs import RunError, load_checkpoint

TINY = ["--z-dim", "8", "--hidden", "16", "--steps", "2", "--batch-size", "16", "--eval-limit", "32",
        "--data-dir", str(SHARED_DATA), "--no-download", "--quiet", "--device", "cpu"]


def fit(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "pyro_rnp.fit", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    out = fit("--preset", "quick", "--limit", "64", "--epochs", "1", "--run-dir", str(run_dir), *TINY)
    assert out.returncode == 0, out.stderr
    return run_dir


def test_run_folder_is_self_describing(trained_run):
    config = json.loads((trained_run / "config.json").read_text())
    assert config["config"]["z_dim"] == 8 and config["config"]["schedule"] == "quick"
    assert "torch" in config["versions"] and config["command"].startswith("python -m pyro_rnp.fit")
    metrics = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1
    for key in ("epoch", "train_loss", "test_neg_elbo", "test_mse", "images_per_s", "wall_time_s", "likelihood"):
        assert key in metrics[0], key
    assert metrics[0]["likelihood"] == "normal(sigma=0.5)"
    for name in ("reconstructions.png", "samples.png", "curves.png"):
        assert (trained_run / "figures" / name).stat().st_size > 1000
    payload = load_checkpoint(trained_run)
    assert payload["epoch"] == 1 and payload["step"] == 4 and payload["batch_in_epoch"] == 0
    assert {"torch", "pyro", "pyro_rnp"} <= set(payload["versions"])


def test_checkpoint_round_trips(trained_run, fashion_images):
    a, b = load_run(trained_run), load_run(trained_run)
    assert not a.training
    x = fashion_images[:4]
    assert torch.equal(a.reconstruct(x), b.reconstruct(x))
    payload = torch.load(trained_run / "checkpoint.pt", weights_only=False)
    for name, value in a.state_dict().items():
        assert torch.equal(value, payload["model"][name]), name


def test_resume_continues_from_the_saved_step(trained_run, tmp_path):
    run_dir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(trained_run), str(run_dir)], check=True)
    out = fit("--resume", str(run_dir), "--epochs", "2", "--data-dir", str(SHARED_DATA), "--no-download",
              "--quiet")
    assert out.returncode == 0, out.stderr
    assert "Resuming" in out.stdout + out.stderr
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [m["step"] for m in metrics] == [4, 8]
    assert load_checkpoint(run_dir)["step"] == 8


def test_resume_refuses_a_different_config(trained_run):
    out = fit("--resume", str(trained_run), "--lr", "0.1", "--epochs", "2")
    assert out.returncode == 1
    assert "cannot resume" in out.stderr and "--lr 0.1" in out.stderr
    assert "Traceback" not in out.stderr


def test_corrupt_checkpoint_is_refused(trained_run, tmp_path):
    run_dir = tmp_path / "corrupt"
    subprocess.run(["cp", "-r", str(trained_run), str(run_dir)], check=True)
    data = (run_dir / "checkpoint.pt").read_bytes()
    (run_dir / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    out = fit("--resume", str(run_dir), "--epochs", "2")
    assert out.returncode == 1
    assert "corrupt or truncated" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(RunError, match="corrupt"):
        load_run(run_dir)


def test_foreign_folder_is_refused(tmp_path):
    with pytest.raises(RunError, match="not a pyro_rnp run folder"):
        load_run(tmp_path)
    out = fit("--resume", str(tmp_path))
    assert out.returncode == 1 and "not a pyro_rnp run folder" in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--dataset", "cifar"], "Invalid value for '--dataset'"),
    (["--epochs", "-1"], "Invalid value for '--epochs'"),
    (["--lr", "0"], "Invalid value for '--lr'"),
    (["--likelihood", "poisson"], "Invalid value for '--likelihood'"),
    (["--device", "tpu"], "Invalid value for '--device'"),
    (["--preset", "quick", "--curriculum", "2"], "leaves no epoch at the full depth"),
])
def test_bad_flags_are_refused_in_one_line(args, message):
    out = fit(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_missing_data_says_where_it_looked(tmp_path, monkeypatch):
    empty = tmp_path / "nodata"
    empty.mkdir()
    # an empty cache too: data extracted or downloaded there by earlier runs is used wherever --data-dir points
    monkeypatch.setenv("PYRO_RNP_CACHE", str(tmp_path / "empty-cache"))
    out = fit("--dataset", "mnist", "--data-dir", str(empty), "--no-download", "--run-dir", str(tmp_path / "r"))
    assert out.returncode == 1
    assert str(empty) in out.stderr and "PYRO_RNP_DATA" in out.stderr and "--data-dir" in out.stderr
    assert "train-images-idx3-ubyte" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()  # nothing written for a run that could not start


def test_ctrl_c_saves_a_loadable_checkpoint_and_resumes(tmp_path):
    run_dir = tmp_path / "interrupted"
    args = [sys.executable, "-u", "-m", "pyro_rnp.fit", "--preset", "quick", "--limit", "800", "--epochs", "3",
            "--run-dir", str(run_dir), *[a for a in TINY if a != "--quiet"]]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = ""
    deadline = time.time() + 180
    while "images/s on cpu" not in seen:  # the time estimate comes after the first few steps
        line = proc.stdout.readline()
        assert line and time.time() < deadline, seen
        seen += line
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, seen + rest
    assert "Checkpoint saved" in rest and f"--resume {run_dir}" in rest
    assert "Traceback" not in rest
    payload = load_checkpoint(run_dir)
    assert payload["epoch"] == 0 and payload["batch_in_epoch"] > 0  # saved mid-epoch
    load_run(run_dir)
    out = fit("--resume", str(run_dir), "--epochs", "1", "--data-dir", str(SHARED_DATA), "--no-download",
              "--quiet")
    assert out.returncode == 0, out.stderr
    assert load_checkpoint(run_dir)["step"] == 50  # 800 images / batch 16, continued where it stopped


def test_the_time_estimate_reads_well_for_short_and_long_runs():
    from pyro_rnp.model.config import RNPConfig
    from pyro_rnp.training.run import how_long_message
    cpu = torch.device("cpu")
    short, quick, paper = (how_long_message(RNPConfig(epochs=epochs), cpu, images_per_s=200.0, epoch_images=images)
                           for epochs, images in ((1, 64), (2, 60_000), (200, 60_000)))
    assert "1 epoch of 64 images takes less than a minute" in short
    assert "2 epochs of 60000 images take about 10 minutes" in quick
    assert "200 epochs of 60000 images take about 16.7 hours" in paper and "--preset quick" in paper
