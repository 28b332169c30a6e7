"""The sparse AND-OR generator: top-k, Langevin on the Pyro model's density, alternating back-propagation,
the importance-sampling bound against an exact likelihood, the template-matching score, and its run folder."""
import json
import math
import os
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn

from conftest import REPO, SHARED_DATA
from pyro_rnp.analysis.evaluate import evaluate
from pyro_rnp.analysis.interpretability import template_matching_score
from pyro_rnp.model.config import RNPConfig
from pyro_rnp.model.sparse_andor import SparseAndOr, top_k_channels, top_k_positions
from pyro_rnp.training.step import AlternatingBackpropStep, make_optimizer


def tiny_config(**overrides) -> RNPConfig:
    values = dict(dataset="mnist", model="sparse-andor", z_dim=8, andor_width=4, langevin_steps=3, infer_steps=20,
                  proposal_samples=8, lr=3e-3, grad_clip=0.0)
    values.update(overrides)
    return RNPConfig(**values)


def test_top_k_keeps_exactly_k_along_its_axis_and_passes_gradients_only_through_the_kept_units():
    torch.manual_seed(0)
    h = torch.randn(2, 10, 4, 4, requires_grad=True)
    out = top_k_channels(h, 3)
    assert ((out != 0).sum(1) == 3).all()                                  # at every position, 3 channels
    top = h.detach().topk(3, dim=1)
    assert torch.equal(out.detach().gather(1, top.indices), top.values)     # ... the 3 largest, unchanged
    out.sum().backward()
    assert torch.equal(h.grad, (out != 0).float())
    h.grad = None
    out = top_k_positions(h, 5)
    assert ((out != 0).flatten(2).sum(2) == 5).all()                       # in every channel, 5 positions
    top = h.detach().flatten(2).topk(5, dim=2)
    assert torch.equal(out.detach().flatten(2).gather(2, top.indices), top.values)
    out.sum().backward()
    assert torch.equal(h.grad, (out != 0).float())


def test_without_sparsity_the_same_network_is_dense():
    torch.manual_seed(0)
    sparse, dense = SparseAndOr(tiny_config()), SparseAndOr(tiny_config(sparsity="none"))
    dense.load_state_dict(sparse.state_dict())
    z = torch.randn(3, 8)
    a_sparse, a_dense = sparse.generator.activations(z), dense.generator.activations(z)
    k = sparse.generator.k_positions[0]
    assert ((a_sparse[2] != 0).flatten(2).sum(2) <= k).all() and (a_dense[2] != 0).flatten(2).sum(2).max() > k
    assert not torch.allclose(sparse.generator(z), dense.generator(z))


def test_the_output_layer_is_linear_by_default_and_runs_written_before_the_choice_keep_their_sigmoid():
    torch.manual_seed(0)
    linear, squashed = SparseAndOr(tiny_config()), SparseAndOr(tiny_config(andor_output="sigmoid"))
    squashed.load_state_dict(linear.state_dict())
    z = torch.randn(5, 8)
    assert torch.allclose(squashed.generator(z), torch.sigmoid(linear.generator(z)))
    with torch.no_grad():
        linear.generator.out.bias.fill_(-2.0)
    assert (linear.generator(z) < 0).all()                                # nothing bounds the Normal's mean
    old = {k: v for k, v in tiny_config().to_dict().items() if k != "andor_output"}
    assert RNPConfig.from_dict(old).andor_output == "sigmoid"
    with pytest.raises(ValueError, match="andor_output"):
        tiny_config(andor_output="tanh")


def test_the_log_density_is_the_pyro_models_and_a_langevin_step_climbs_it(mnist_images):
    torch.manual_seed(0)
    model = SparseAndOr(tiny_config())
    x, z = mnist_images[:6], torch.randn(6, 8)
    expected = (dist.Normal(0.0, 1.0).log_prob(z).sum(1)
                + dist.Normal(model.generator(z), 0.5).log_prob(x).flatten(1).sum(1))
    assert torch.allclose(model.log_joint(z, x), expected, atol=1e-3)
    before = model.log_joint(z, x)
    moved = model.langevin(z, x, 1, noise=False)
    assert (model.log_joint(moved, x) > before).all()
    assert all(p.grad is None for p in model.parameters())                 # inference leaves g's gradients alone


def test_a_langevin_drift_is_bounded_per_latent_and_unbounded_without_the_limit(mnist_images):
    torch.manual_seed(0)
    x, z = mnist_images[:6], 3 * torch.randn(6, 8)
    bounded = SparseAndOr(tiny_config(langevin_max_drift=0.01))
    free = SparseAndOr(tiny_config(langevin_max_drift=None))
    free.load_state_dict(bounded.state_dict())
    step, free_step = bounded.langevin(z, x, 1, noise=False) - z, free.langevin(z, x, 1, noise=False) - z
    moved, free_moved = step.norm(dim=1), free_step.norm(dim=1)
    assert torch.allclose(moved, torch.full_like(moved, 0.01), rtol=1e-4)     # each shortened to the limit
    assert (free_moved > 0.01).all()
    assert torch.allclose(step, 0.01 * free_step / free_moved[:, None], atol=1e-6)   # along the same direction


def test_held_out_inference_leaves_a_point_where_every_unit_is_off(mnist_images):
    """z = 0 is a stationary point once the fully connected layer's biases are negative (every unit off, zero
    gradient); the guide starts from a prior draw and climbs from there."""
    torch.manual_seed(0)
    model = SparseAndOr(tiny_config())
    with torch.no_grad():
        model.generator.fc.bias.fill_(-1.0)
    x = mnist_images[:8]
    zero = torch.zeros(8, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(model.log_joint(zero, x).sum(), zero)
    assert torch.equal(grad, torch.zeros_like(grad))                       # Adam from z = 0 would stay there
    torch.manual_seed(1)
    start = torch.randn(8, 8)                                              # the prior draw find_mode starts from
    torch.manual_seed(1)
    found = model.find_mode(x, 30)
    assert (found.norm(dim=1) > 0.1).all()                                  # not stuck at z = 0
    assert (model.log_joint(found, x) > model.log_joint(start, x)).all()   # and Adam climbed from its start


def test_alternating_back_propagation_lowers_the_reconstruction_error_on_real_images(mnist_images):
    torch.manual_seed(0)
    pyro.clear_param_store()
    model = SparseAndOr(tiny_config())
    x = mnist_images[:64]
    step = AlternatingBackpropStep(model, make_optimizer(model, 3e-3), training_images=64)
    rows = torch.arange(64)

    def error():
        with torch.no_grad():
            return (model.generator(model.train_latents) - x).pow(2).mean().item()

    first = error()
    latents_before = model.train_latents.clone()
    for k in range(30):
        loss, applied = step(x, k, index=rows)
        assert bool(applied) and torch.isfinite(loss)
    assert not torch.equal(model.train_latents, latents_before)            # the persistent latents moved
    assert error() < 0.8 * first      # (the linear output starts near the black image, already at 0.1)


class LinearGenerator(nn.Module):
    """g(z) = W z + b on 28x28 images: with a Normal likelihood, p(x) is Gaussian and known exactly."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        self.fc = nn.Linear(z_dim, 28 * 28)
        with torch.no_grad():
            self.fc.weight.normal_(0, 0.05)
            self.fc.bias.fill_(0.1)

    def forward(self, z):
        return self.fc(z).reshape(*z.shape[:-1], 1, 28, 28)


def test_the_importance_sampling_bound_holds_against_an_exact_linear_gaussian_likelihood(mnist_images):
    torch.manual_seed(0)
    model = SparseAndOr(tiny_config(z_dim=4, infer_steps=60, proposal_samples=30))
    model.generator = LinearGenerator(4)
    x = mnist_images[:8]
    w, b = model.generator.fc.weight.detach(), model.generator.fc.bias.detach()
    exact = dist.MultivariateNormal(b, w @ w.T + 0.25 * torch.eye(784)).log_prob(x.flatten(1))   # (8,)
    calls = []
    langevin = model.langevin
    model.langevin = lambda *args, **kwargs: calls.append(1) or langevin(*args, **kwargs)
    result = evaluate(model, x, iw_samples=64)
    assert len(calls) == 30   # one inference (30 proposal states) for the 8 images, reused by 16 chunks and the MSE
    assert result["iwae_nll"] >= -exact.mean().item() - 0.05               # a bound (up to Monte Carlo noise)
    # and a close one: within 3 nats of 325 (a proposal from the prior is hundreds of nats off)
    assert result["iwae_nll"] - (-exact.mean().item()) < 3.0
    assert result["neg_elbo"] >= result["iwae_nll"]


def test_the_template_matching_score_is_one_for_an_image_patch_and_low_for_noise(mnist_images):
    image = mnist_images[0, 0]
    patch = torch.zeros(28, 28)
    patch[6:20, 8:22] = image[6:20, 8:22]
    assert template_matching_score(patch[None], image[None])["score"] == pytest.approx(1.0, abs=1e-4)
    noise = torch.rand(4, 28, 28, generator=torch.Generator().manual_seed(0))
    low = template_matching_score(noise, mnist_images[:20])
    assert low["primitives"] == 4 and low["images"] == 20 and low["score"] < 0.3


def test_a_layer_3_unit_in_context_draws_only_within_its_receptive_field(mnist_images):
    torch.manual_seed(0)
    model = SparseAndOr(tiny_config(infer_steps=5, proposal_samples=2)).eval()
    drawings = model.basis_functions(3, mnist_images[:8], in_context=True)[:, 0]
    assert drawings.shape == (model.generator.channels[2], 28, 28)
    # a layer-3 unit at 14x14 covers a 2x2 block at 28x28; two 3x3 convs and the 3x3 output widen it by 3 each side
    drawn = 0
    for d in drawings:
        rows, cols = torch.nonzero(d.abs() > 1e-6, as_tuple=True)
        if rows.numel():
            drawn += 1
            assert rows.max() - rows.min() < 8 and cols.max() - cols.min() < 8
    assert drawn >= 2                                # the test is not vacuous: some units are active
    alone = model.basis_functions(3, mnist_images[:8], units=3)
    assert alone.shape == (3, 1, 28, 28) and torch.isfinite(alone).all()


def test_on_scenes_a_linear_probe_counts_from_the_latent_held_out_inference_finds(multi_mnist_scenes):
    from pyro_rnp.analysis.scenes import count_accuracy
    images, counts, _ = multi_mnist_scenes
    torch.manual_seed(0)
    model = SparseAndOr(tiny_config(dataset="multi-mnist", infer_steps=5, proposal_samples=2)).eval()
    torch.manual_seed(1)
    z = model.encode(images[:4])
    torch.manual_seed(1)
    assert z.shape == (4, 8) and torch.equal(z, model.infer(images[:4])[0])
    result = count_accuracy(model, images[32:], counts[32:], train=(images[:32], counts[:32]))
    assert result["method"] == "linear probe on z" and result["n_images"] == 32 and 0 <= result["accuracy"] <= 1
    assert sum(map(sum, result["confusion"])) == 32


def test_fit_trains_the_quick_preset_and_the_ablation_from_the_command_line(tmp_path):
    from pyro_rnp import load_run
    run_dir = tmp_path / "andor"
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.fit", "--dataset", "mnist", "--model", "sparse-andor",
                          "--preset", "quick", "--sparsity", "none", "--limit", "64", "--batch-size", "32",
                          "--epochs", "1", "--eval-limit", "4", "--run-dir", str(run_dir), "--quiet"],
                         capture_output=True, text=True, cwd=REPO, timeout=600,
                         env=dict(os.environ, PYRO_RNP_DATA=str(SHARED_DATA)))
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert (config["model"], config["sparsity"], config["z_dim"], config["langevin_steps"]) == (
        "sparse-andor", "none", 100, 10)
    model = load_run(run_dir)
    assert isinstance(model, SparseAndOr) and not model.generator.sparse and model.train_latents.shape == (64, 100)


@pytest.fixture(scope="module")
def tiny_andor_run(tmp_path_factory):
    from pyro_rnp.fit import train
    run_dir = tmp_path_factory.mktemp("andor") / "run"
    config = tiny_config(limit=64, epochs=1, eval_limit=4, batch_size=32, infer_steps=6, proposal_samples=2)
    train(config, run_dir, torch.device("cpu"), SHARED_DATA, download=False, progress=False)
    return run_dir


def test_a_run_keeps_its_latents_resumes_and_every_command_works_or_refuses(tiny_andor_run):
    from pyro_rnp import load_run
    run_dir = tiny_andor_run
    env = dict(os.environ, PYRO_RNP_DATA=str(SHARED_DATA))

    def command(*args):
        return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=600)

    model = load_run(run_dir)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]
    assert model.train_latents.shape == (64, 8) and torch.equal(model.train_latents, saved["train_latents"])
    out = command("pyro_rnp.fit", "--resume", str(run_dir), "--epochs", "2", "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    resumed = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert resumed["epoch"] == 2 and not torch.equal(resumed["model"]["train_latents"], saved["train_latents"])
    out = command("pyro_rnp.evaluate", str(run_dir), "--limit", "4", "--iw-samples", "2", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert math.isfinite(result["iwae_nll"]) and result["neg_elbo"] >= result["iwae_nll"] - 1e-6
    out = command("pyro_rnp.ppc", str(run_dir), "--limit", "4", "--samples", "2", "--json")
    assert out.returncode == 0 and json.loads(out.stdout.strip().splitlines()[-1])["n_images"] == 4, out.stderr
    out = command("pyro_rnp.figures", str(run_dir), "--which", "basis,primitives,samples")
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((run_dir / "figures.json").read_text())
    for kind in ("layer 3 basis functions", "layer 3 basis functions in context"):
        entry = record["interpretability"][kind]   # a tiny generator may draw none visibly
        assert entry["images"] == 100 and (entry["primitives"] == 0 or 0 <= entry["score"] <= 1), entry
    assert (run_dir / "figures" / "basis.png").stat().st_size > 1000
    for args, message in ((["pyro_rnp.figures", str(run_dir), "--which", "parse"], "no program trees"),
                          (["pyro_rnp.transfer", str(run_dir), "--classes", "2"], "is not one encoder")):
        out = command(*args)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, \
            out.stderr


def test_the_energy_based_critic_learns_to_tell_observed_from_generated_images(mnist_images):
    torch.manual_seed(0)
    model = SparseAndOr(tiny_config(andor_critic=True))
    x = mnist_images[:64]
    step = AlternatingBackpropStep(model, make_optimizer(model, 3e-3), training_images=64)
    generator_before = [p.detach().clone() for p in model.generator.parameters()]
    for k in range(15):
        loss, applied = step(x, k, index=torch.arange(64))
        assert bool(applied) and torch.isfinite(loss)
    with torch.no_grad():
        observed, generated = model.critic(x).mean(), model.critic(model.sample(64)).mean()
    assert observed < generated                                           # observed images: lower energy
    assert all(not torch.equal(a, b) for a, b in zip(generator_before, model.generator.parameters()))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
