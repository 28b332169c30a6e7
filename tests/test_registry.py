"""The model registry: a run trains a named model, load_run rebuilds whichever model it was, every
command works on the models that have what it needs and refuses the others in one line, and run
folders written before models had names still read."""
import json
import logging
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHARED_DATA, tiny_config
from pyro_rnp import RNP, VAE, build_model, load_run, model_names
from pyro_rnp.analysis.evaluate import evaluate
from pyro_rnp.data import load_images
from pyro_rnp.fit import train
from pyro_rnp.model import RNPConfig, require
from pyro_rnp.model.registry import has
from pyro_rnp.training.runs import CHECKPOINT, read_config

COMMITTED_RUNS = sorted(p.parent for p in (REPO / "runs").glob("*/config.json"))


def command(name, *args):
    return subprocess.run([sys.executable, "-m", f"pyro_rnp.{name}", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "vae"
    train(tiny_config(model="vae", decoder_hidden=32, limit=32, epochs=1, eval_limit=8), run_dir,
          torch.device("cpu"), SHARED_DATA, download=False, progress=False)
    return run_dir


def test_the_registry_builds_each_model_with_its_capabilities():
    assert {"rnp", "vae"} <= set(model_names())
    rnp, vae = build_model(tiny_config()), build_model(tiny_config(model="vae"))
    assert type(rnp) is RNP and type(vae) is VAE
    assert all(has(rnp, c) for c in ("guide", "parts", "programs"))
    assert has(vae, "guide") and not has(vae, "parts") and not has(vae, "programs")
    with pytest.raises(ValueError, match="needs a model with program trees.*it works on: rnp"):
        require(vae, "programs", "the parse figure")
    with pytest.raises(ValueError, match="unknown model 'glom'"):
        build_model(tiny_config(model="glom"))


def test_every_model_provides_the_protocol(fashion_images):
    """model, guide, reconstruct and sample, with the shapes the protocol states."""
    import pyro.poutine as poutine
    x = fashion_images[:3]
    for name in ("rnp", "vae"):
        model = build_model(tiny_config(model=name)).eval()
        assert model.objective == "trace_elbo"
        trace = poutine.trace(model.model).get_trace(x)
        assert trace.nodes["x"]["is_observed"] and trace.nodes["z"]["value"].shape == (3, 8)
        assert poutine.trace(model.guide).get_trace(x).nodes["z"]["value"].shape == (3, 8)
        assert model.reconstruct(x).shape == x.shape
        assert model.sample(5).shape == (5, 1, 28, 28)
    parts = build_model(tiny_config(steps=3)).eval().parts(x)
    assert parts.placed.shape == (3, 3, 1, 28, 28) and parts.labels == ["part 1", "part 2", "part 3"]
    assert torch.allclose(parts.placed.sum(1), parts.canvas, atol=1e-5)  # Normal likelihood: mean is the canvas


def test_the_mlp_decoder_is_the_vae_model():
    """A config that says decoder "mlp" (every config before models had names) is the vae model."""
    assert RNPConfig(decoder="mlp").model == "vae"
    assert RNPConfig(model="vae").decoder == "mlp"
    old = RNPConfig(decoder="mlp").to_dict()
    del old["model"]
    assert RNPConfig.from_dict(old).model == "vae"


@pytest.mark.parametrize("run_dir", COMMITTED_RUNS, ids=[p.name for p in COMMITTED_RUNS])
def test_every_committed_run_folder_still_reads(run_dir):
    config = read_config(run_dir)
    model = build_model(config)
    recorded = json.loads((run_dir / "config.json").read_text())["config"]
    # runs written before models had names say "decoder": "mlp" for the vae and nothing for the rnp
    expected = recorded.get("model") or ("vae" if recorded.get("decoder") == "mlp" else "rnp")
    assert config.model == expected and model.config == config


def test_a_run_written_before_models_had_names_loads_and_evaluates(tmp_path, fashion_images):
    """A run folder and checkpoint whose config has no "model" field (as every run before the registry)."""
    run_dir = tmp_path / "old"
    train(tiny_config(limit=32, epochs=1, eval_limit=8), run_dir, torch.device("cpu"), SHARED_DATA,
          download=False, progress=False)
    record = json.loads((run_dir / "config.json").read_text())
    del record["config"]["model"]
    (run_dir / "config.json").write_text(json.dumps(record))
    payload = torch.load(run_dir / CHECKPOINT, weights_only=False)
    del payload["config"]["model"]
    torch.save(payload, run_dir / CHECKPOINT)
    model = load_run(run_dir)
    assert type(model) is RNP
    result = evaluate(model, fashion_images[:8])
    assert torch.isfinite(torch.tensor(result["neg_elbo"]))


def test_the_vae_run_loads_as_a_vae_and_its_figures_are_the_ones_it_has(vae_run):
    assert type(load_run(vae_run)) is VAE
    out = command("figures", str(vae_run), "--n", "3", "--data-dir", str(SHARED_DATA), "--no-download")
    assert out.returncode == 0, out.stderr
    assert "samples.png" in out.stdout and "parse.png" not in out.stdout
    out = command("figures", str(vae_run), "--which", "parse", "--data-dir", str(SHARED_DATA), "--no-download")
    assert out.returncode == 2 and "no parse figure" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = command("evaluate", str(vae_run), "--limit", "8", "--json", "--data-dir", str(SHARED_DATA),
                  "--no-download")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["n_images"] == 8


def test_fit_takes_a_model_by_name_and_refuses_an_mlp_rnp(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.fit", "--model", "rnp", "--decoder", "mlp",
                          "--run-dir", str(tmp_path / "x")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "use --model vae" in out.stderr
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.fit", "--model", "nope"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 2 and "unknown model 'nope'; choose one of rnp, vae, air, dmvae" in out.stderr


@pytest.mark.parametrize("name", ["evaluate", "ppc", "figures", "transfer", "export"])
def test_the_commands_on_a_run_share_their_options(name):
    out = command(name, "--help")
    assert out.returncode == 0
    for option in ("--limit", "--device", "--data-dir", "--no-download", "--seed", "PYRO_RNP_DATA"):
        assert option in out.stdout, (name, option)


def test_a_cached_copy_of_the_data_is_named_when_the_data_folder_lacks_it(tmp_path, caplog):
    load_images("mnist", "test", SHARED_DATA, download=False, limit=2)  # fills our cache from the .gz files
    with caplog.at_level(logging.INFO, logger="pyro_rnp.data"):
        images = load_images("mnist", "test", tmp_path / "empty", download=False, limit=2).tensors[0]
    assert images.shape == (2, 1, 28, 28)
    lines = [r.getMessage() for r in caplog.records if r.name == "pyro_rnp.data"]
    assert len(lines) == 1 and str(tmp_path / "empty") in lines[0] and "verified copy" in lines[0]
