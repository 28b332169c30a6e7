"""Transfer: only the encoder adapts; the decoder is frozen; the command reports before and after."""
import json
import subprocess
import sys

import torch

from conftest import REPO, SHARED_DATA, tiny_config
from pyro_rnp import RNP
from pyro_rnp.fit import train
from pyro_rnp.analysis.transfer import adapt_encoder


def test_adaptation_changes_the_encoder_and_nothing_else(fashion_images):
    rnp = RNP(tiny_config())
    before = {k: v.clone() for k, v in rnp.state_dict().items()}
    adapt_encoder(rnp, fashion_images[:64], epochs=1, lr=1e-3, batch_size=16)
    changed = {k for k, v in rnp.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("encoder.") for k in changed), changed
    assert any(k.endswith("weight") for k in changed)
    for name, p in rnp.named_parameters():
        assert p.requires_grad == name.startswith("encoder."), name


def test_transfer_command(tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(dataset="mnist", limit=64, epochs=1, eval_limit=16, exclude_classes=(7,))
    train(config, run_dir, torch.device("cpu"), SHARED_DATA, download=False, progress=False)
    common = ["--data-dir", str(SHARED_DATA), "--no-download", "--quiet"]
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.transfer", str(run_dir), "--classes", "7", "--epochs", "1",
                          "--train-limit", "48", "--limit", "16", *common],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads((run_dir / "transfer.json").read_text())
    for key in ("seen_mse", "unseen_mse_before", "unseen_mse_after", "unseen_neg_elbo_before",
                "unseen_neg_elbo_after", "likelihood"):
        assert key in result, key
    assert result["classes"] == [7] and result["n_unseen"] == 16 and result["train_images"] == 48
    assert (run_dir / "figures" / "transfer.png").stat().st_size > 1000
    wrong = subprocess.run([sys.executable, "-m", "pyro_rnp.transfer", str(run_dir), "--classes", "3", *common],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    assert wrong.returncode == 2 and "was trained on class 3" in wrong.stderr and "Traceback" not in wrong.stderr
