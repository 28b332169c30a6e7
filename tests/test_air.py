"""AIR (pyro_rnp/model/air.py): its Pyro sites, its TraceGraph_ELBO training with learned baselines, and
what the commands read of it, on a tiny AIR and real Multi-MNIST scenes."""
from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from conftest import SHARED_DATA, scene_model_config, tiny_config, train_and_check
from pyro_rnp.model.air import AIR, BASELINE_NETWORKS
from pyro_rnp.model.registry import build_model
from pyro_rnp.training import TrainStep, make_optimizer


def air_config(**overrides):
    return scene_model_config("air", **overrides)


def test_model_and_guide_have_the_documented_sites_in_one_unscaled_plate(multi_mnist_scenes):
    x = multi_mnist_scenes[0][:5]
    air = build_model(air_config())
    assert isinstance(air, AIR) and air.objective == "tracegraph_elbo"
    guide = poutine.trace(air.guide).get_trace(x)
    model = poutine.trace(poutine.replay(air.model, trace=guide)).get_trace(x)
    latent = [f"{kind}_{t}" for t in range(3) for kind in ("z_pres", "z_where", "z_what")]
    def sites(trace):
        return [n for n, s in trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)]

    assert sites(guide) == latent and sites(model) == latent + ["x"]
    for trace in (guide, model):
        for name in sites(trace):
            site = trace.nodes[name]
            frame, = site["cond_indep_stack"]
            # no subsample scale: the baselines' targets are one image's downstream cost
            assert frame.name == "data" and frame.size == 5 and site["scale"] == 1.0, name
    pres = torch.stack([guide.nodes[f"z_pres_{t}"]["value"] for t in range(3)], 1).squeeze(-1)
    assert ((pres[:, 1:] <= pres[:, :-1])).all()  # once 0, always 0
    assert model.nodes["x"]["value"].shape == (5, 1, 50, 50)
    for t in range(3):
        baseline = guide.nodes[f"z_pres_{t}"]["infer"]["baseline"]["baseline_value"]
        assert baseline.shape == (5,) and baseline.requires_grad


def test_training_lowers_the_loss_and_baselines_learn_at_their_own_rate(multi_mnist_scenes):
    x = multi_mnist_scenes[0][:32]
    torch.manual_seed(0)
    air = build_model(air_config(baseline_lr=0.05))
    optimizer = make_optimizer(air, 1e-3)
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    baseline = [p for name in BASELINE_NETWORKS for p in getattr(air, name).parameters()]
    assert all(rates[id(p)] == 0.05 for p in baseline)
    assert all(rates[id(p)] == 1e-3 for p in air.decoder.parameters())
    assert len(rates) == len(list(air.parameters()))
    step = TrainStep(air, optimizer, grad_clip=0.0)
    losses = train_and_check(air, step, x, 1)  # every network, baselines included, gets a finite gradient
    assert any(p.grad.abs().sum() > 0 for p in baseline)
    losses += train_and_check(air, step, x, 29)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses


def test_what_the_commands_read(multi_mnist_scenes):
    x = multi_mnist_scenes[0][:6]
    air = build_model(air_config())
    counts = air.count(x)
    assert counts.shape == (6,) and counts.dtype == torch.int64 and ((0 <= counts) & (counts <= 3)).all()
    parts = air.parts(x)
    assert parts.placed.shape == (6, 3, 1, 50, 50) and parts.present.shape == (6, 3)
    assert torch.equal(parts.present.sum(1), counts)
    assert torch.allclose(parts.placed.sum(1), parts.canvas, atol=1e-5)  # Normal likelihood: mean = canvas
    assert air.reconstruct(x).shape == (6, 1, 50, 50)
    torch.manual_seed(0)
    assert air.sample(4).shape == (4, 1, 50, 50)
    latents = air.sample_latents(1000)
    observed = latents.z_pres.mean(0)  # Bernoulli(rho) chain: P(z_pres_t = 1) = rho^(t + 1), rho = 1/2 here
    assert torch.allclose(observed, torch.tensor([0.5, 0.25, 0.125]), atol=0.05)


def test_the_rnp_and_the_vae_draw_scenes_on_a_50_pixel_canvas_with_28_pixel_patches(multi_mnist_scenes):
    from pyro_rnp import RNP
    from pyro_rnp.model.vae import VAE
    x = multi_mnist_scenes[0][:16]
    torch.manual_seed(0)
    rnp = RNP(tiny_config(dataset="multi-mnist"))
    assert rnp.config.image_size == 50 and rnp.config.patch_size == 28
    assert rnp.executor.hypernet.initial_patch[-1].out_features == 28 * 28  # programs keep their size
    tree = rnp.parse(x[:3])
    top, part = tree.levels()[0][0], tree.levels()[1][0]
    assert top.canvas.shape == (3, 1, 50, 50) and top.placed.shape == (3, 3, 1, 50, 50)
    assert top.patches.shape == (3, 3, 1, 28, 28) and part.canvas.shape == (3, 1, 28, 28)
    assert torch.allclose(top.placed.sum(1), top.canvas, atol=1e-5)
    for model in (rnp, VAE(tiny_config(dataset="multi-mnist", model="vae"))):
        step = TrainStep(model, make_optimizer(model, 1e-3))
        losses = [step(x, k)[0].item() for k in range(12)]
        assert losses[-1] < losses[0], (type(model).__name__, losses)
        assert model.reconstruct(x[:2]).shape == (2, 1, 50, 50) and model.sample(2).shape == (2, 1, 50, 50)


def test_count_accuracy_and_its_confusion_matrix_on_a_hand_made_set():
    from pyro_rnp.analysis.scenes import confusion
    predicted = torch.tensor([0, 1, 2, 2, 1, 0, 5])
    true = torch.tensor([0, 1, 2, 1, 1, 2, 2])
    result = confusion(predicted, true, 3)
    assert result["accuracy"] == pytest.approx(4 / 7) and result["n_images"] == 7
    assert result["confusion"] == [[1, 0, 0], [0, 2, 1], [1, 0, 1]]  # the 5 is wrong and in no column


def test_iwae_with_one_sample_is_the_elbo_and_more_samples_never_hurt_on_average(multi_mnist_scenes):
    from pyro_rnp.analysis.evaluate import evaluate
    x = multi_mnist_scenes[0][:8]
    torch.manual_seed(0)
    air = build_model(air_config())
    step = TrainStep(air, make_optimizer(air, 1e-3), grad_clip=0.0)
    for k in range(5):
        step(multi_mnist_scenes[0][8:40], k)
    pyro.set_rng_seed(1)
    one = evaluate(air, x, iw_samples=1)
    assert one["iwae_nll"] == pytest.approx(one["neg_elbo"], abs=1e-6)
    bounds = []
    for seed in range(3):
        pyro.set_rng_seed(seed)
        bounds.append(evaluate(air, x, iw_samples=16)["iwae_nll"])
    pyro.set_rng_seed(1)
    elbos = [evaluate(air, x, iw_samples=1)["neg_elbo"] for _ in range(3)]
    assert sum(bounds) / 3 <= sum(elbos) / 3


def test_an_air_run_round_trips_through_load_run_and_every_command(tmp_path, multi_mnist_scenes):
    import json
    import os
    import subprocess
    import sys
    from pyro_rnp import load_run
    from conftest import REPO
    run_dir = tmp_path / "air"
    env = dict(os.environ, PYRO_RNP_DATA=str(SHARED_DATA))
    fit = [sys.executable, "-m", "pyro_rnp.fit", "--dataset", "multi-mnist", "--model", "air", "--preset", "quick",
           "--limit", "64", "--epochs", "1", "--eval-limit", "32", "--batch-size", "16", "--run-dir", str(run_dir),
           "--quiet"]
    out = subprocess.run(fit, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["model"] == "air" and config["image_size"] == 50 and config["likelihood_scale"] == 0.3
    model = load_run(run_dir)
    assert isinstance(model, AIR) and model.count(multi_mnist_scenes[0][:4]).shape == (4,)
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.evaluate", str(run_dir), "--limit", "40", "--json"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["count"]["method"] == "the model's own count" and result["count"]["n_images"] == 40
    assert sum(map(sum, result["count"]["confusion"])) <= 40
    purity = result["part_purity"]
    assert purity["identity"].startswith("k-means cluster") and purity["images"] > 0
    for command, message in ((["pyro_rnp.figures", str(run_dir), "--which", "parse"], "no program trees"),
                             (["pyro_rnp.figures", str(run_dir), "--which", "memory"], "no memory of slots"),
                             (["pyro_rnp.transfer", str(run_dir), "--classes", "2"], "is not one encoder")):
        out = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, cwd=REPO, env=env,
                             timeout=600)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.ppc", str(run_dir), "--limit", "6", "--samples", "3",
                          "--json"], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["n_images"] == 6


def test_on_mnist_air_scales_its_prior_to_the_digit_and_evaluate_reports_part_purity(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from conftest import REPO
    from pyro_rnp.model.config import RNPConfig
    assert RNPConfig.preset("mnist", "quick", model="air").air_scale_mean == 1.4      # 28 / MNIST's 20-pixel box
    assert RNPConfig.preset("multi-mnist", "quick", model="air").air_scale_mean == 3.0  # the tutorial's
    assert RNPConfig.preset("mnist", "quick", model="air", air_scale_mean=2.0).air_scale_mean == 2.0
    # the RNP's quick rate under Multi-MNIST's sigma 0.3 (1e-3 diverged there); the VAE keeps the quick one
    assert RNPConfig.preset("multi-mnist", "quick").lr == 3e-4 and RNPConfig.preset("fashion", "quick").lr == 1e-3
    assert RNPConfig.preset("multi-mnist", "quick", model="vae").lr == 1e-3
    run_dir = tmp_path / "air-mnist"
    env = dict(os.environ, PYRO_RNP_DATA=str(SHARED_DATA))
    fit = [sys.executable, "-m", "pyro_rnp.fit", "--dataset", "mnist", "--model", "air", "--preset", "quick",
           "--likelihood-scale", "0.3", "--limit", "64", "--epochs", "1", "--eval-limit", "32", "--batch-size", "16",
           "--run-dir", str(run_dir), "--quiet"]
    out = subprocess.run(fit, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["image_size"] == 28 and config["likelihood_scale"] == 0.3 and config["air_scale_mean"] == 1.4
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.evaluate", str(run_dir), "--limit", "40", "--json"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "count" not in result and result["likelihood"] == "normal(sigma=0.3)"
    purity = result["part_purity"]   # NMI needs two parts; an untrained AIR may find fewer
    assert purity["images"] == 40 and (purity["parts"] < 2 or 0 <= purity["nmi"] <= 1), purity
