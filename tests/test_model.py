import dataclasses

import pytest
import torch
from pyro.infer import Trace_ELBO

from conftest import tiny_config
from pyro_rnp import RNP, RNPConfig
from pyro_rnp.hypernet import GeneratedLayer, GeneratedPrograms, HyperNetwork, fast_backward
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
        rnp.zero_grad(set_to_none=True)
        with fast_backward() if fast else torch.enable_grad():
            Trace_ELBO().differentiable_loss(rnp.model, rnp.guide, x).backward()
        for name, p in rnp.named_parameters():
            assert p.grad is not None, f"{name} got no gradient (fast={fast})"
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient (fast={fast})"


def test_generated_layer_gradients_match_plain_autograd():
    """The hand-written backward (one gradient per layer over all steps, in-place head gradient) is exact."""
    n, hidden = 4, 6
    layout = [GeneratedLayer("a", 5, 3, True, "g"), GeneratedLayer("b", 3, 4, False, "g"),
              GeneratedLayer("h0", 0, 4, True, "g"), GeneratedLayer("unused", 2, 2, True, "g")]
    numel = sum(layer.numel for layer in layout)

    def run(mode):
        torch.manual_seed(1)
        h = torch.randn(n, hidden, dtype=torch.float64, requires_grad=True)
        head = torch.nn.Parameter(torch.randn(hidden, numel, dtype=torch.float64))
        xs = [torch.randn(n, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        if mode == "plain":
            value = h @ head
            wa, wb, h0 = value[:, :18].view(n, 6, 3), value[:, 18:30].view(n, 3, 4), value[:, 30:34]
            layer_a = lambda x: torch.bmm(x.unsqueeze(1), wa[:, :5]).squeeze(1) + wa[:, 5]
            layer_b = lambda x: torch.bmm(x.unsqueeze(1), wb).squeeze(1)
        else:
            programs = GeneratedPrograms(h, head, layout)
            layer_a = lambda x: programs.apply("a", x)
            layer_b = lambda x: programs.apply("b", x)
            h0 = programs.apply("h0", h.new_empty(n, 0))
        loss = sum((layer_b(layer_a(x)).sin() * (k + 1) * h0).sum() for k, x in enumerate(xs))
        loss.backward()
        return [h.grad, head.grad] + [x.grad for x in xs]

    plain = run("plain")
    generated = run("generated")
    with fast_backward():
        fast = run("generated")
    for a, b, c in zip(plain, generated, fast):
        assert torch.allclose(a, b, atol=1e-10)
        assert torch.allclose(a, c, atol=1e-10)


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


@pytest.mark.parametrize("elu,elu_first,out", [(True, True, None), (True, False, "relu"), (True, False, "sin"),
                                                (False, False, "relu"), (False, True, "sin")])
def test_generated_chain_matches_its_layers_one_by_one(elu, elu_first, out):
    """GeneratedPrograms.chain (one graph node for a generated MLP) gives the values and gradients of
    applying its layers and activations one at a time."""
    n, hidden = 4, 6
    layout = [GeneratedLayer("a", 5, 3, True, "g"), GeneratedLayer("b", 3, 4, True, "g"),
              GeneratedLayer("c", 4, 2, False, "g")]
    numel = sum(layer.numel for layer in layout)
    finish = {None: lambda y: y, "relu": torch.relu, "sin": torch.sin}[out]
    act = torch.nn.functional.elu if elu else (lambda y: y)

    def run(chained):
        torch.manual_seed(2)
        h = torch.randn(n, hidden, dtype=torch.float64, requires_grad=True)
        head = torch.nn.Parameter(torch.randn(hidden, numel, dtype=torch.float64) / 3)
        x = torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
        programs = GeneratedPrograms(h, head, layout)
        if chained:
            y = programs.chain(("a", "b", "c"), x, elu, elu_first, out)
        else:
            y = x
            for k, name in enumerate("abc"):
                y = programs.apply(name, act(y) if k > 0 or elu_first else y)
            y = finish(y)
        (y * torch.arange(1.0, 3.0, dtype=torch.float64)).sum().backward()
        return [y.detach(), x.grad, h.grad, head.grad]

    for a, b in zip(run(False), run(True)):
        assert torch.allclose(a, b, atol=1e-12)


def test_training_works_after_decoding_under_inference_mode():
    """Caches and recycled buffers made under torch.inference_mode must not reach a training step."""
    rnp = RNP(tiny_config())
    with torch.inference_mode():
        rnp.decode(torch.randn(3, rnp.config.z_dim))
    step = TrainStep(rnp, make_optimizer(rnp, 1e-3))
    loss, applied = step(torch.rand(3, 1, 28, 28))
    assert bool(applied) and torch.isfinite(loss)
