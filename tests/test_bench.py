import json
import subprocess
import sys

from conftest import REPO


def test_bench_reports_images_per_second():
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.bench", "--batch-size", "4", "--steps", "1",
                          "--rounds", "1", "--reference", "none", "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["images_per_s"] > 0 and result["batch_size"] == 4


def test_bench_refuses_cuda_without_a_gpu():
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.bench", "--device", "cuda"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "CUDA is not available" in out.stderr


def test_bench_refuses_unknown_variants_and_bf16_on_cpu():
    for variants, message in (("fp32,nope", "unknown variant nope"), ("bf16", "bf16 autocast is for CUDA")):
        out = subprocess.run([sys.executable, "-m", "pyro_rnp.bench", "--variants", variants, "--device", "cpu"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
