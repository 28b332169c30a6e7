import json
import os
import subprocess
import sys

from conftest import REPO


def test_bench_times_ours_and_the_reference_port_round_by_round():
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.bench", "--batch-size", "4", "--steps", "1",
                          "--rounds", "2", "--json"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["images_per_s"] > 0 and result["batch_size"] == 4
    assert len(result["runs"]) == len(result["reference_runs"]) == 2
    rounds = [a / b for a, b in zip(result["runs"], result["reference_runs"])]
    assert result["ratio"] == sum(rounds) / 2  # the median of two rounds' ratios
    assert result["torch"] == __import__("torch").__version__ and "fp32" in result["head_products"]
    assert "oneDNN" in result["head_products"]["fp32"] or "torch.mm" in result["head_products"]["fp32"]


def test_bench_says_when_a_worker_fails(tmp_path):
    broken = tmp_path / "port.py"
    broken.write_text("raise RuntimeError('this port does not run')\n")
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.bench", "--batch-size", "4", "--steps", "1",
                          "--rounds", "1", "--reference", str(broken)], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert out.returncode == 1
    assert "the reference benchmark worker failed" in out.stderr and "this port does not run" in out.stderr


def test_bench_refuses_cuda_without_a_gpu():
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.bench", "--device", "cuda"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "CUDA is not available" in out.stderr


def test_bench_refuses_unknown_variants_and_bf16_on_a_cpu_without_it():
    env = dict(os.environ, PYRO_RNP_CPU_BF16="0")  # this CPU as one without avx512_bf16 or AMX
    for variants, message in (("fp32,nope", "unknown variant nope"), ("bf16", "does not compute bfloat16 natively")):
        out = subprocess.run([sys.executable, "-m", "pyro_rnp.bench", "--variants", variants, "--device", "cpu"],
                             capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
