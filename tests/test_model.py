import dataclasses

import pytest
import torch
from pyro.infer import Trace_ELBO

from conftest import tiny_config
from pyro_rnp import RNP, RNPConfig
from pyro_rnp.fast import accelerate, plain, program_path
from pyro_rnp.model.hypernet import HyperNetwork
from pyro_rnp.training import TrainStep, make_optimizer


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_tree_shapes_at_every_level(depth):
    config = tiny_config(depth=depth, steps=2)
    rnp = RNP(config)
    z = torch.randn(5, config.z_dim)
    out = rnp.decode(z)
    levels = out.tree.levels()
    assert len(levels) == depth
    for k, nodes in enumerate(levels):
        assert len(nodes) == config.steps ** k  # tau children per program
        for node in nodes:
            assert node.level == depth - k
            assert node.z.shape == (5, config.z_dim)
            assert node.canvas.shape == (5, 1, 28, 28)
            assert node.theta.shape == (5, config.steps, 2, 3)
            assert node.patches.shape == node.placed.shape == (5, config.steps, 1, 28, 28)
            # additive compositing: the placed children make up the canvas
            assert torch.allclose(node.placed.sum(1), node.canvas, atol=1e-5)
            assert (node.predictions is None) == (node.level == 1)
            for t, child in enumerate(node.children):
                assert torch.allclose(child.canvas, node.patches[:, t], atol=1e-6)
    assert torch.equal(out.canvas, out.tree.canvas)


def test_any_batch_shape_runs():
    rnp = RNP(tiny_config())
    out = rnp.decode(torch.randn(2, 3, 8), record=False)
    assert out.canvas.shape == (2, 3, 1, 28, 28)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_every_parameter_gets_a_finite_gradient(depth, fashion_images):
    rnp = RNP(tiny_config(depth=depth, steps=2))
    x = fashion_images[:8]
    for fast in (False, True):
        (accelerate if fast else plain)(rnp)
        rnp.zero_grad(set_to_none=True)
        with program_path(rnp).training_pass() if fast else torch.enable_grad():
            Trace_ELBO().differentiable_loss(rnp.model, rnp.guide, x).backward()
        for name, p in rnp.named_parameters():
            assert p.grad is not None, f"{name} got no gradient (fast={fast})"
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient (fast={fast})"


def test_fresh_model_draws_a_sane_canvas():
    """With the authors' Glorot scale the generated networks start small: no explosion, no NaN."""
    torch.manual_seed(0)
    rnp = RNP(RNPConfig())  # paper sizes
    with torch.no_grad():
        canvas = rnp.decode(torch.randn(16, 32), record=False).canvas
    assert torch.isfinite(canvas).all()
    assert canvas.min() >= 0
    assert 0 < canvas.max() < 5


def test_hypernetwork_generates_a_program_of_the_papers_size():
    hyper = HyperNetwork(z_dim=32)
    assert hyper.numel_per_program == 133376  # RNP-MODEL.md: about 1.33e5 numbers per program


def test_loss_falls_on_a_small_real_subset(fashion_images):
    torch.manual_seed(0)
    config = tiny_config()
    rnp = RNP(config)
    step = TrainStep(rnp, make_optimizer(rnp, config.lr), config.grad_clip)
    x_all = fashion_images[:128]
    losses = []
    for i in range(40):
        x = x_all[(i * 16) % 128:(i * 16) % 128 + 16]
        loss, applied = step(x, i)
        assert applied
        losses.append(loss.item() / x.shape[0])
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_linear_generated_layers_are_a_config_choice():
    a = RNP(tiny_config(generated_activation="linear"))
    out = a.decode(torch.randn(3, 8), record=False)
    assert torch.isfinite(out.canvas).all()
    with pytest.raises(ValueError, match="generated_activation"):
        tiny_config(generated_activation="relu")


def test_config_presets():
    paper = RNPConfig.preset("fashion")
    assert (paper.z_dim, paper.depth, paper.steps, paper.lr, paper.batch_size, paper.epochs) == (32, 2, 4, 4e-5, 64, 200)
    omniglot = RNPConfig.preset("omniglot")
    assert (omniglot.z_dim, omniglot.epochs) == (96, 400)
    quick = RNPConfig.preset("mnist", "quick")
    assert quick.z_dim == 32 and quick.depth == 2 and quick.lr > paper.lr and quick.epochs < paper.epochs
    assert dataclasses.replace(paper, depth=3).depth == 3
    with pytest.raises(ValueError, match="unknown dataset"):
        RNPConfig.preset("cifar")
    assert RNPConfig.from_dict(paper.to_dict()) == paper
    long = RNPConfig.preset("fashion", "long")   # quick's rates and schedule, ten times the epochs
    assert long.epochs == 10 * RNPConfig.preset("fashion", "quick").epochs
    assert dataclasses.replace(long, epochs=2, schedule="quick", figure_every=1) == RNPConfig.preset("fashion", "quick")
    assert RNPConfig.preset("multi-mnist", "long").lr == 3e-4 and RNPConfig.preset("mnist", "long", model="vae").epochs == 20
    with pytest.raises(ValueError, match="the long preset is the RNP's and the VAE's"):
        RNPConfig.preset("mnist", "long", model="air")
