"""Swappable priors, guides and decoders: each trains, round-trips through a run folder and works
with Pyro's machinery; bad names are refused with the valid ones."""
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Predictive, Trace_ELBO

from conftest import tiny_config
from pyro_rnp import RNP, load_run
from pyro_rnp.model import components
from pyro_rnp.analysis.evaluate import evaluate
from pyro_rnp.analysis.per_image import autonormal_from, fit_autonormal
from pyro_rnp.training.runs import save_checkpoint, write_config
from pyro_rnp.training import TrainStep, make_optimizer

VARIANTS = [dict(prior="normal"), dict(prior="mog"), dict(prior="vamp"), dict(prior="flow"),
            dict(guide="resnet-lowrank"), dict(guide="resnet-iaf"), dict(decoder="mlp")]
IDS = ["-".join(v.values()) for v in VARIANTS]


def train_steps(rnp, x, steps=12, lr=3e-3):
    step = TrainStep(rnp, make_optimizer(rnp, lr))
    return [step(x, k)[0].item() / x.shape[0] for k in range(steps)]


def save_run(rnp, run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, rnp.config)
    save_checkpoint(run_dir, rnp, None, epoch=1, step=1, batch_in_epoch=0, wall_time_s=0.0)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_every_component_trains_round_trips_and_works_with_pyro(variant, fashion_images, tmp_path):
    x = fashion_images[:32]
    rnp = RNP(tiny_config(**variant))
    losses = train_steps(rnp, x)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    assert all(p.grad is not None for p in rnp.parameters()), "a parameter got no gradient"

    rnp.eval()
    save_run(rnp, tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    assert (loaded.config.prior, loaded.config.guide, loaded.config.decoder) == \
        (rnp.config.prior, rnp.config.guide, rnp.config.decoder)
    assert type(loaded.prior) is type(rnp.prior) and type(loaded.encoder) is type(rnp.encoder)
    z = torch.randn(5, rnp.config.z_dim)
    with torch.no_grad():
        torch.testing.assert_close(loaded.prior().log_prob(z), rnp.prior().log_prob(z))
        torch.testing.assert_close(loaded.encode(x[:4]), rnp.encode(x[:4]))
        torch.testing.assert_close(loaded.reconstruct(x[:4]), rnp.reconstruct(x[:4]))

    loss = Trace_ELBO().differentiable_loss(loaded.model, loaded.guide, x[:4])
    assert torch.isfinite(loss)
    samples = Predictive(loaded.model, guide=loaded.guide, num_samples=3, return_sites=["z", "x"])(x[:4])
    assert samples["z"].shape == (3, 4, rnp.config.z_dim) and samples["x"].shape == (3, 4, 1, 28, 28)
    guide_trace = poutine.trace(loaded.guide).get_trace(x[:4])
    assert guide_trace.nodes["z"]["fn"].event_shape == (rnp.config.z_dim,)
    assert [f.name for f in guide_trace.nodes["z"]["cond_indep_stack"]] == ["data"]


def test_flow_prior_density_is_the_change_of_variables():
    rnp = RNP(tiny_config(prior="flow", z_dim=3))
    with torch.no_grad():  # move the flows off the identity they start at
        for p in rnp.prior.parameters():
            p.normal_(0, 0.3)
    prior = rnp.prior()
    z = torch.randn(3)
    # p(z) = N(f(z); 0, I) |det df/dz| with f the map back to the base (the MAF direction, one pass per layer)

    def to_base(v):
        for flow in reversed(rnp.prior.flows):
            v = flow(v)
        return v
    jacobian = torch.autograd.functional.jacobian(to_base, z)
    expected = torch.distributions.Normal(0, 1).log_prob(to_base(z)).sum() + torch.linalg.slogdet(jacobian)[1]
    torch.testing.assert_close(prior.log_prob(z), expected, atol=1e-4, rtol=1e-4)


def test_vamp_prior_learns_pseudo_images_and_leaves_batch_norm_statistics_alone(fashion_images):
    rnp = RNP(tiny_config(prior="vamp"))
    stats = {name: b.clone() for name, b in rnp.encoder.named_buffers()}
    rnp.train()
    rnp.prior().log_prob(torch.randn(4, 8)).sum().backward()
    assert rnp.prior.pseudo_logits.grad.abs().sum() > 0
    assert all(torch.equal(b, stats[name]) for name, b in rnp.encoder.named_buffers())
    assert rnp.encoder.training  # restored


def test_low_rank_and_iaf_guides_start_as_the_diagonal_guide(fashion_images):
    x = fashion_images[:4]
    torch.manual_seed(0)
    diagonal = RNP(tiny_config()).eval()
    for guide in ("resnet-lowrank", "resnet-iaf"):
        torch.manual_seed(0)
        other = RNP(tiny_config(guide=guide)).eval()
        other.encoder.load_state_dict(diagonal.encoder.state_dict(), strict=False)
        z = diagonal.encoder.posterior(x).sample()
        torch.testing.assert_close(other.encoder.posterior(x).log_prob(z), diagonal.encoder.posterior(x).log_prob(z),
                                   atol=1e-4, rtol=1e-4)


def test_autonormal_moves_only_its_own_parameters_and_round_trips(fashion_images, tmp_path):
    source = RNP(tiny_config())
    train_steps(source, fashion_images[:32], steps=5)
    source.eval()
    images = fashion_images[100:106]
    config = tiny_config(guide="autonormal", limit=6)
    rnp = autonormal_from(source, images, config)
    frozen = {name: p.detach().clone() for name, p in [*rnp.executor.named_parameters(), *rnp.prior.named_parameters()]}
    start = rnp.encode(images).clone()
    torch.testing.assert_close(start, source.encode(images))  # starts at the amortized posterior mean
    before = evaluate(rnp, images, iw_samples=64)["neg_elbo"]
    fit_autonormal(rnp, passes=40, lr=0.05)
    assert evaluate(rnp, images, iw_samples=64)["neg_elbo"] < before
    assert all(torch.equal(p, frozen[name]) for name, p in
               [*rnp.executor.named_parameters(), *rnp.prior.named_parameters()]), "a decoder parameter moved"
    assert not torch.equal(rnp.encode(images), start)
    # any subset, in any order, is matched to its own q(z_n); an image it was not fitted to is refused
    torch.testing.assert_close(rnp.encode(images[[4, 1]]), rnp.encode(images)[[4, 1]])
    with pytest.raises(ValueError, match="not among them"):
        rnp.encode(fashion_images[:2])

    save_run(rnp, tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    torch.testing.assert_close(loaded.encode(images), rnp.encode(images))
    samples = Predictive(loaded.model, guide=loaded.guide, num_samples=2, return_sites=["z"])(images)
    assert samples["z"].shape == (2, 6, 8)


def test_mlp_decoder_has_no_parts_and_says_so(fashion_images):
    rnp = RNP(tiny_config(decoder="mlp")).eval()
    assert rnp.reconstruct(fashion_images[:3]).shape == (3, 1, 28, 28)
    with pytest.raises(ValueError, match="draws no parts"):
        rnp.parse(fashion_images[:3])


@pytest.mark.parametrize("kind", ["prior", "guide", "decoder"])
def test_unknown_names_are_refused_with_the_valid_ones(kind):
    with pytest.raises(ValueError, match=f"unknown {kind} 'nope'; choose one of .*{components.names(kind)[1]}"):
        RNP(tiny_config(**{kind: "nope"}))


def test_components_passed_as_modules_replace_the_named_ones(fashion_images):
    class ShiftedPrior(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = torch.nn.Parameter(torch.zeros(8))

        def forward(self):
            return pyro.distributions.Normal(self.loc, 1.0).to_event(1)

    rnp = RNP(tiny_config(), prior=ShiftedPrior())
    train_steps(rnp, fashion_images[:16], steps=3)
    assert rnp.prior.loc.grad is not None and rnp.prior.loc.abs().sum() > 0
