"""The observation models and dynamic binarisation: densities that integrate to one, means that are
what the commands draw, learned scales that train and load, and binary draws that are fresh each
epoch yet reproducible."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHARED_DATA, tiny_config, train_and_check
from pyro_rnp import RNP, load_run
from pyro_rnp.data import binarize
from pyro_rnp.model.config import RNPConfig
from pyro_rnp.model.likelihoods import make_likelihood
from pyro_rnp.training.loop import TrainingLoop
from pyro_rnp.training.step import TrainStep, make_optimizer

CONTINUOUS = ("normal", "normal-learned", "normal-pixel", "laplace", "continuous-bernoulli")
LEARNED = ("normal-learned", "normal-pixel", "laplace")


def one_pixel_density(name: str, canvas_value: float, x: torch.Tensor) -> torch.Tensor:
    """The density at grey levels x (N,) of one pixel whose canvas is canvas_value."""
    likelihood = make_likelihood(name, 0.3, image_size=1)
    canvas = torch.full((1, 1, 1, 1), canvas_value, dtype=torch.float64)
    if isinstance(likelihood, torch.nn.Module):
        likelihood = likelihood.double()
    return likelihood.distribution(canvas).log_prob(x.double().view(-1, 1, 1, 1)).exp()


@pytest.mark.parametrize("name", CONTINUOUS)
@pytest.mark.parametrize("canvas_value", [0.05, 0.69, 2.0])  # 0.69: lambda near 1/2, where the CB normaliser is delicate
def test_each_density_integrates_to_one_over_its_support(name, canvas_value):
    low, high = (0.0, 1.0) if name == "continuous-bernoulli" else (canvas_value - 12.0, canvas_value + 12.0)
    x = torch.linspace(low, high, 200_001, dtype=torch.float64)
    density = one_pixel_density(name, canvas_value, x)
    assert torch.trapezoid(density, x).item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("name", CONTINUOUS + ("bernoulli",))
def test_the_mean_is_the_distributions_and_is_what_reconstruct_returns(name, fashion_images):
    torch.manual_seed(0)
    likelihood = make_likelihood(name, 0.3, image_size=28)
    canvas = torch.rand(2, 1, 28, 28) * 2
    draws = likelihood.distribution(canvas).sample((4000,))
    assert torch.allclose(draws.mean(0), likelihood.mean(canvas), atol=0.03)
    rnp = RNP(tiny_config(likelihood=name)).eval()
    x = fashion_images[:3]
    with torch.no_grad():
        canvas = rnp.decode(rnp.encode(x), record=False).canvas
    assert torch.allclose(rnp.reconstruct(x), likelihood.mean(canvas) if not isinstance(likelihood, torch.nn.Module)
                          else rnp.likelihood.mean(canvas))
    if name == "continuous-bernoulli":  # its mean is not its parameter: reconstruct must not draw lambda
        assert not torch.allclose(rnp.reconstruct(x), -torch.expm1(-canvas), atol=1e-3)


@pytest.mark.parametrize("name", LEARNED + ("continuous-bernoulli",))
def test_a_few_training_steps_lower_the_loss_and_the_learned_scale_trains(name, fashion_images):
    torch.manual_seed(0)
    rnp = RNP(tiny_config(likelihood=name))
    step = TrainStep(rnp, make_optimizer(rnp, 3e-3), grad_clip=0.0)
    before = [p.detach().clone() for p in rnp.likelihood.parameters()] if name in LEARNED else []
    losses = train_and_check(rnp, step, fashion_images[:32], 15)   # every parameter, the scale too, has a gradient
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    for old, new in zip(before, rnp.likelihood.parameters() if before else ()):
        assert not torch.equal(old, new)


def test_a_learned_scale_is_saved_and_loaded_with_the_run(tmp_path):
    from pyro_rnp.fit import train
    config = tiny_config(likelihood="normal-pixel", limit=32, epochs=1, eval_limit=4, batch_size=16)
    model = train(config, tmp_path / "run", torch.device("cpu"), SHARED_DATA, download=False, progress=False)
    assert model.likelihood.log_scale.shape == (1, 28, 28)
    loaded = load_run(tmp_path / "run")
    assert torch.equal(loaded.likelihood.log_scale, model.likelihood.log_scale)
    assert not torch.allclose(loaded.likelihood.log_scale, torch.full((1, 28, 28), 0.5).log())  # it trained


def test_dynamic_binarisation_is_fresh_each_epoch_and_the_same_for_the_same_seed_and_epoch(fashion_images):
    x = fashion_images[:64]
    first = binarize(x, seed=0, epoch=0)
    assert set(first.unique().tolist()) <= {0.0, 1.0} and first.dtype == x.dtype
    assert torch.equal(first, binarize(x, seed=0, epoch=0))
    assert not torch.equal(first, binarize(x, seed=0, epoch=1)) and not torch.equal(first, binarize(x, seed=1, epoch=0))
    assert not torch.equal(binarize(x, seed=0), first)                               # the held-out draw is its own
    assert torch.equal(binarize(x[:10], seed=0, epoch=3), binarize(x, seed=0, epoch=3)[:10])  # a prefix is a prefix
    draws = torch.stack([binarize(x, seed=0, epoch=e) for e in range(200)])
    error = draws.mean(0) - x                  # each pixel 1 with probability its grey level: 200 draws, sd <= 0.035
    assert error.abs().max() < 0.2 and error.mean().abs() < 0.002   # and no bias over the 50,176 pixels


def test_the_training_loop_trains_each_epoch_on_that_epochs_draw(fashion_images):
    x = fashion_images[:32]
    seen = []

    class RecordingStep:
        rnp = torch.nn.Linear(1, 1)

        def __call__(self, batch, step, index=None):
            seen.append((batch.clone(), index.clone()))
            return torch.zeros(()), torch.ones((), dtype=torch.bool)

    loop = TrainingLoop(RecordingStep(), x, 16, seed=0, progress=False,
                        images_for_epoch=lambda epoch: binarize(x, 0, epoch))
    loop.run(2)
    assert len(seen) == 4
    for k, (batch, rows) in enumerate(seen):
        assert torch.equal(batch, binarize(x, 0, k // 2)[rows])


def test_dynamic_binarisation_needs_the_bernoulli_likelihood_and_the_command_says_so(tmp_path):
    with pytest.raises(ValueError, match="needs likelihood 'bernoulli'"):
        RNPConfig(binarize="dynamic")
    env = dict(os.environ, PYRO_RNP_DATA=str(SHARED_DATA))
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.fit", "--dataset", "mnist", "--preset", "quick",
                          "--binarize", "dynamic", "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 2 and "needs likelihood 'bernoulli'" in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.fit", "--dataset", "mnist", "--model", "vae", "--preset",
                          "quick", "--likelihood", "bernoulli", "--binarize", "dynamic", "--limit", "32", "--epochs",
                          "1", "--batch-size", "16", "--eval-limit", "8", "--run-dir", str(tmp_path / "run"),
                          "--quiet"], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dynamically binarised" in out.stdout
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert (config["binarize"], config["likelihood"]) == ("dynamic", "bernoulli")
