"""DM-VAE (pyro_rnp/model/dmvae.py): relaxed sites in training, hard ones in evaluation, the information
loss, and what the commands read, on a tiny DM-VAE and real Multi-MNIST scenes."""
from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from conftest import scene_model_config, tiny_config, train_and_check
from pyro_rnp.analysis.evaluate import evaluate
from pyro_rnp.model.dmvae import DMVAE
from pyro_rnp.model.registry import build_model
from pyro_rnp.training import TrainStep, make_optimizer


def dmvae_config(**overrides):
    return scene_model_config("dmvae", **{"max_parts": 2, **overrides})


def _sites(trace):
    return {n: s for n, s in trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}


def test_training_sites_are_relaxed_and_reparameterised_evaluation_sites_are_hard(scene_images):
    x = scene_images[:4]
    model = build_model(dmvae_config())
    assert isinstance(model, DMVAE) and model.objective == "trace_elbo"
    model.train()
    guide = _sites(poutine.trace(model.guide).get_trace(x))
    names = [f"{kind}_{t}" for t in range(2) for kind in ("z_pres", "z_where", "z_type", "eps")]
    assert sorted(guide) == sorted(names)
    assert all(site["fn"].has_rsample for site in guide.values())  # no REINFORCE, no baselines
    types = guide["z_type_0"]["value"]
    assert types.shape == (4, 5) and torch.allclose(types.sum(-1), torch.ones(4), atol=1e-4)
    assert not torch.all((types == 0) | (types == 1))  # relaxed
    model.eval()
    trace = poutine.trace(model.guide).get_trace(x)
    replayed = _sites(poutine.trace(poutine.replay(model.model, trace=trace)).get_trace(x))
    hard = _sites(trace)
    discrete = [s["value"] for n, s in hard.items() if n.startswith(("z_pres", "z_type"))]
    assert len(discrete) == 4 and all(((v == 0) | (v == 1)).all() for v in discrete)
    assert "information" in replayed and "x" in replayed


def test_relaxed_and_hard_addresses_agree_at_low_temperature(scene_images):
    torch.manual_seed(0)
    model = build_model(dmvae_config(dmvae_temperature=0.01))
    logits = model.address_logits(scene_images[:16, 0, 10:38, 10:38].flatten(1))
    model.train()
    relaxed = model._address(logits).rsample((200,))
    model.eval()
    hard = model._address(logits).sample((200,))
    assert ((relaxed.max(-1).values > 0.99).float().mean() > 0.95)  # nearly one-hot
    # the same distribution over slots: the frequencies of each slot agree
    freq_relaxed = torch.nn.functional.one_hot(relaxed.argmax(-1), 5).float().mean(0)
    freq_hard = hard.mean(0)
    assert torch.allclose(freq_relaxed, freq_hard, atol=0.15)


def test_training_lowers_the_loss_and_the_information_loss_reaches_every_network(scene_images):
    x = scene_images[:32]
    torch.manual_seed(0)
    model = build_model(dmvae_config(dmvae_gamma=5.0))
    step = TrainStep(model, make_optimizer(model, 1e-3), grad_clip=0.0)
    losses = train_and_check(model, step, x, 1)
    assert model.memory.grad.abs().sum() > 0 and model.log_sharpness.grad.abs() > 0
    losses += train_and_check(model, step, x, 29)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    info = model.information()
    info.backward()
    for net in (model.generator, model.noise_prior, model.crop_embedding, model.slot_embedding):
        assert any(p.grad.abs().sum() > 0 for p in net.parameters())


def test_evaluation_bounds_counts_addresses_and_slots(scene_images):
    x = scene_images[:6]
    torch.manual_seed(0)
    model = build_model(dmvae_config())
    pyro.set_rng_seed(0)
    one = evaluate(model, x, iw_samples=1)
    assert one["iwae_nll"] == pytest.approx(one["neg_elbo"], abs=1e-6)
    pyro.set_rng_seed(0)
    many = evaluate(model, x, iw_samples=8)
    assert many["iwae_nll"] <= many["neg_elbo"] + 1e-6
    assert model.training  # evaluate restores the mode it found (hard sites only inside it)
    counts, addresses = model.count(x), model.address(x)
    assert counts.shape == (6,) and addresses.shape == (6, 2)
    assert torch.equal((addresses >= 0).sum(1), counts) and addresses.max() < 5
    parts = model.parts(x)
    assert parts.placed.shape == (6, 2, 1, 50, 50) and torch.equal(parts.present.sum(1), counts)
    assert model.slot_drawings(3).shape == (5, 3, 1, 28, 28)
    assert model.sample(3).shape == (3, 1, 50, 50) and model.reconstruct(x).shape == (6, 1, 50, 50)


def test_the_memory_figure_shows_every_slot_and_its_share_of_the_parts(scene_images, tmp_path):
    from pyro_rnp.analysis.scenes import plot_memory
    from pyro_rnp.model.registry import has
    model = build_model(dmvae_config())
    assert has(model, "memory") and has(model, "count") and not has(model, "programs")
    path, summary = plot_memory(model, scene_images[:20], tmp_path / "memory.png", samples=3)
    assert path.is_file() and len(summary["usage"]) == 5 and summary["n_images"] == 20
    assert summary["parts"] == int(model.count(scene_images[:20]).sum())
    assert summary["parts"] == 0 or abs(sum(summary["usage"]) - 1) < 1e-9


def test_part_purity_reads_each_model_s_parts_in_one_digit_scenes(multi_mnist_scenes):
    from pyro_rnp import RNP
    from pyro_rnp.analysis.scenes import part_purity
    images, counts, digits = multi_mnist_scenes
    one = int(((digits >= 0).sum(1) == 1).sum())
    assert one > 5
    dmvae = build_model(dmvae_config())
    result = part_purity(dmvae, images, digits)
    assert result["identity"] == "address" and result["images"] == one
    assert result["parts"] == int(dmvae.count(images[(digits >= 0).sum(1) == 1]).sum())
    assert result["parts"] < 2 or 0 <= result["nmi"] <= 1
    rnp = RNP(tiny_config(dataset="multi-mnist"))
    result = part_purity(rnp, images, digits, clusters=4)
    assert result["identity"] == "k-means cluster (k=4)" and result["parts"] == one * 3  # 3 parts per program
    assert 0 <= result["nmi"] <= 1
    assert counts.shape == (64,)
