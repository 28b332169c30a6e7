"""The model and guide work with Pyro's own machinery, not only with our training loop."""
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

from conftest import tiny_config
from pyro_rnp import RNP


@pytest.fixture
def rnp():
    return RNP(tiny_config())


def test_sites_plates_and_shapes(rnp, fashion_images):
    x = fashion_images[:6]
    guide_trace = poutine.trace(rnp.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(rnp.model, trace=guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    z = model_trace.nodes["z"]
    assert z["value"].shape == (6, 8)
    assert z["fn"].event_shape == (8,) and z["fn"].batch_shape == (6,)
    assert [f.name for f in z["cond_indep_stack"]] == ["data"]
    assert model_trace.nodes["x"]["is_observed"]
    assert model_trace.nodes["x"]["log_prob"].shape == (6,)
    assert model_trace.nodes["parts"]["log_prob"].shape == (6,)  # the part-level regulariser, per image
    assert "parts" not in poutine.trace(rnp.model).get_trace(x, part_term=False).nodes


@pytest.mark.parametrize("elbo", [Trace_ELBO(), TraceMeanField_ELBO(), RenyiELBO(alpha=0.5, num_particles=2),
                                  Trace_ELBO(num_particles=3, vectorize_particles=True)])
def test_elbo_estimators(rnp, fashion_images, elbo):
    x = fashion_images[:4]
    if isinstance(elbo, RenyiELBO):  # it has no differentiable_loss; SVI calls loss_and_grads
        loss = torch.tensor(elbo.loss_and_grads(rnp.model, rnp.guide, x))
    else:
        loss = elbo.differentiable_loss(rnp.model, rnp.guide, x)
        assert loss.shape == ()
        loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in rnp.executor.parameters())


def test_svi_with_pyro_optim(rnp, fashion_images):
    svi = SVI(rnp.model, rnp.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    before = rnp.executor.hypernet.head.detach().clone()
    losses = [svi.step(fashion_images[:8]) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, rnp.executor.hypernet.head)


def test_predictive_posterior_and_prior(rnp, fashion_images):
    x = fashion_images[:5]
    rnp.eval()
    posterior = Predictive(rnp.model, guide=rnp.guide, num_samples=3, return_sites=["z", "x"])(x)
    assert posterior["z"].shape == (3, 5, 8)
    assert posterior["x"].shape == (3, 5, 1, 28, 28)
    prior = Predictive(rnp.model, num_samples=2, return_sites=["z", "x"])(None, batch_size=4)
    assert prior["x"].shape == (2, 4, 1, 28, 28)
    assert prior["z"].shape == (2, 4, 8)


def test_bernoulli_likelihood(fashion_images):
    rnp = RNP(tiny_config(likelihood="bernoulli"))
    x = fashion_images[:4]
    loss = Trace_ELBO().differentiable_loss(rnp.model, rnp.guide, x)
    assert torch.isfinite(loss)
    trace = poutine.trace(rnp.model).get_trace(x)
    assert set(trace.nodes["x"]["value"].unique().tolist()) <= {0.0, 1.0}
