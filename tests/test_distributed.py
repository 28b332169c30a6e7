"""Training on several processes (torch.distributed, gloo on CPU) makes the same updates as one
process on the same global batch, and only rank 0 writes the run folder."""
import json
import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp

from conftest import REPO, SHARED_DATA, tiny_config
from pyro_rnp import load_run
from pyro_rnp.training.distributed import SyncedBatchNorm

PLUGIN = str(REPO / "tests" / "plugins" / "map_guide.py")


def config(batch_size):
    # a point-mass guide: no sampled noise, so the processes' updates are comparable exactly
    return tiny_config(guide="point", plugins=(PLUGIN,), batch_size=batch_size, limit=64, epochs=1, eval_limit=16,
                       lr=1e-3, figure_every=100)


def _worker(rank, world, port, run_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), PYRO_RNP_DATA=str(SHARED_DATA))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    from pyro_rnp.training.distributed import setup, teardown
    from pyro_rnp.fit import train
    context, device = setup(torch.device("cpu"))
    try:
        rnp = train(config(8), run_dir, device, SHARED_DATA, download=False, progress=False, context=context)
        torch.save(rnp.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        teardown(context)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    """In float64: in float32 the two runs sum the same gradient in different orders, and the
    program's spatial sampling has kinks at pixel boundaries, so rounding-size differences grow
    into visible ones within a few steps; in float64 they stay at rounding size."""
    from pyro_rnp.fit import train
    runs = tmp_path / "runs"
    mp.spawn(_worker, args=(2, free_port(), str(runs / "ddp"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"processes disagree on {name}"

    torch.set_default_dtype(torch.float64)
    try:
        single = train(config(16), runs / "single", torch.device("cpu"), SHARED_DATA, download=False,
                       progress=False).state_dict()
    finally:
        torch.set_default_dtype(torch.float32)
    moved = 0
    for name, value in single.items():
        if value.is_floating_point():
            assert rank0[name].dtype == value.dtype == torch.float64, (name, rank0[name].dtype, value.dtype)
            torch.testing.assert_close(rank0[name], value, atol=1e-7, rtol=1e-6, msg=f"{name} differs")
            moved += 1
    assert moved > 50
    # rank 0 alone wrote its folder, which loads like any other
    assert sorted(p.name for p in runs.iterdir()) == ["ddp", "single"]
    assert sorted(p.name for p in (runs / "ddp").iterdir()) == ["checkpoint.pt", "config.json", "figures",
                                                                "metrics.jsonl"]
    loaded = load_run(runs / "ddp")
    torch.testing.assert_close(loaded.state_dict()["executor.hypernet.head"], rank0["executor.hypernet.head"].float())


def test_synced_batch_norm_is_batch_norm_in_one_process():
    bn, synced = torch.nn.BatchNorm2d(3), SyncedBatchNorm(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(synced(x), bn(x))
    torch.testing.assert_close(synced.running_var, bn.running_var)


def test_torchrun_command_trains_and_resumes_in_one_process(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYRO_RNP_DATA=str(SHARED_DATA), OMP_NUM_THREADS="1")
    common = ["--dataset", "mnist", "--preset", "quick", "--limit", "128", "--eval-limit", "32", "--z-dim", "8",
              "--hidden", "16", "--quiet"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "pyro_rnp.fit", *common, "--batch-size", "16", "--epochs", "1", "--run-dir", str(run_dir)]
    out = subprocess.run(torchrun, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("Run folder:") == 1  # rank 0 alone reports
    record = json.loads((run_dir / "config.json").read_text())
    assert record["distributed"] == {"processes": 2, "backend": "gloo", "batch_per_process": 16,
                                     "global_batch_size": 32, "lr": 1e-3}
    # continue the torchrun run in a single process
    resume = [sys.executable, "-m", "pyro_rnp.fit", "--resume", str(run_dir), "--epochs", "2", "--quiet"]
    out = subprocess.run(resume, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
