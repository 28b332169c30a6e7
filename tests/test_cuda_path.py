"""What the CUDA path needs, checked on a CPU: no host waits reached inside the training step,
full precision where it matters under bfloat16 autocast (CPU autocast casts the same products),
the encoder really compiled, RNG states restored from a checkpoint, and the synced batch norm's
statistics in float32. What only a GPU can show is in ``python -m pyro_rnp.gpucheck``."""
import os
import socket

import pyro
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from pyro.infer import Trace_ELBO

from conftest import tiny_config
from pyro_rnp import RNP
from pyro_rnp.model.likelihoods import BernoulliLikelihood
from pyro_rnp.model.spatial import _scale_offset, action_to_theta, affine_grid, place
from pyro_rnp.training import TrainStep, make_optimizer
from pyro_rnp.training.run import compile_model, rank_seed
from pyro_rnp.training.step import TraceELBOOnDevice

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _refuse(*args, **kwargs):
    raise AssertionError("a host wait inside the training step")


def test_no_host_wait_is_reached_inside_the_step(fashion_images, monkeypatch):
    """.item(), bool(tensor), float(tensor) and .tolist() all wait for a CUDA device: the step (with
    validation off, as on CUDA) reaches none of them."""
    rnp = RNP(tiny_config())
    step = TrainStep(rnp, make_optimizer(rnp, 1e-3))
    x = fashion_images[:8]
    step(x, 0)  # caches made once (the scale offset, the base grid) are made here
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, _refuse)
    with pyro.validation_enabled(False):
        for k in (1, 2):
            loss, applied = step(x, k)
    monkeypatch.undo()
    assert bool(applied) and torch.isfinite(loss)


def test_the_on_device_elbo_gives_pyros_loss_and_gradients(fashion_images):
    rnp = RNP(tiny_config())
    x = fashion_images[:6]
    results = []
    for elbo in (Trace_ELBO(), TraceELBOOnDevice()):
        rnp.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss = elbo.differentiable_loss(rnp.model, rnp.guide, x)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in rnp.named_parameters()}))
    (pyro_loss, pyro_grads), (ours, grads) = results
    assert torch.allclose(ours, pyro_loss, rtol=1e-6)
    for name, g in pyro_grads.items():
        assert torch.equal(grads[name], g), name


def test_placement_stays_in_full_precision_under_bf16_autocast():
    action = torch.rand(5, 6) * 2 - 1
    theta = action_to_theta(action, 3.3)
    patch = torch.rand(5, 1, 28, 28)
    with torch.autocast(**BF16):
        theta_amp = action_to_theta(action.bfloat16(), 3.3)
        grid = affine_grid(theta_amp, 28, 28)
        placed = place(patch.bfloat16(), theta_amp)
    assert theta_amp.dtype == grid.dtype == placed.dtype == torch.float32
    assert torch.equal(theta_amp[:, 0, 0] - action.bfloat16().float()[:, 0], torch.full((5,), 3.3))
    assert torch.allclose(theta_amp, theta, atol=1e-2)
    assert _scale_offset.cache_info().hits > 0  # made once per device, not copied from the host per call


def test_the_bernoulli_part_term_runs_under_autocast_in_float32():
    likelihood = BernoulliLikelihood()
    prediction, target = torch.rand(4, 1, 28, 28) * 3, torch.rand(4, 1, 28, 28)
    expected = F.binary_cross_entropy(likelihood.probs(prediction), target, reduction="none").flatten(1).sum(1)
    assert torch.allclose(likelihood.part_error(prediction, target), expected, rtol=1e-5)
    with torch.autocast(**BF16):
        amp = likelihood.part_error(prediction.bfloat16(), target.bfloat16())
    assert amp.dtype == torch.float32 and torch.allclose(amp, expected, rtol=2e-2)


@pytest.mark.parametrize("guide", ["resnet", "resnet-lowrank"])
def test_the_guides_distribution_is_full_precision_under_autocast(guide, fashion_images):
    """The guide's location, scale, low-rank factor, samples and density stay float32 under autocast
    (the low-rank Normal's Cholesky factor has no bfloat16 kernel on CUDA)."""
    rnp = RNP(tiny_config(guide=guide)).eval()
    x = fashion_images[:4]
    q = rnp.encoder.posterior(x)
    z = q.sample()
    with torch.autocast(**BF16):
        q_amp = rnp.encoder.posterior(x)
        z_amp = q_amp.rsample()
        log_q = q_amp.log_prob(z)
    assert q_amp.mean.dtype == z_amp.dtype == log_q.dtype == torch.float32
    assert torch.allclose(log_q, q.log_prob(z), rtol=0.05, atol=0.5)  # the features were computed in bf16


def test_a_bf16_training_step_keeps_float32_weights_and_learns(fashion_images):
    rnp = RNP(tiny_config(guide="resnet-lowrank", likelihood="bernoulli"))
    step = TrainStep(rnp, make_optimizer(rnp, 1e-3), amp="bf16")
    x = fashion_images[:16]
    losses = [step(x, k)[0].item() for k in range(15)]
    assert all(p.dtype == torch.float32 for p in rnp.parameters())
    assert losses[-1] < losses[0], losses


def test_compile_really_compiles_the_encoder(fashion_images):
    """The guides read the encoder through features_of and heads, not forward: compiling its stacks as
    modules compiles what the guide runs (counted with dynamo's counters)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    rnp = RNP(tiny_config(guide="resnet-lowrank"))
    compile_model(rnp, backend="eager")
    rnp.encoder.posterior(fashion_images[:4]).rsample()
    assert counters["stats"]["unique_graphs"] >= 2  # the convolutional stack and the fully connected one
    torch._dynamo.reset()


def test_only_batch_norm_statistics_are_kept_to_undo_a_step():
    rnp = RNP(tiny_config())
    step = TrainStep(rnp, make_optimizer(rnp, 1e-3))
    norms = [m for m in rnp.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(step.buffers) == 3 * len(norms) > 0  # running mean, running variance, batches tracked


def test_processes_draw_their_own_noise():
    seeds = {rank_seed(0, rank, step) for rank in range(1, 4) for step in (0, 100)}
    assert len(seeds) == 6 and all(0 <= s < 2 ** 63 for s in seeds)


def _synced_norm_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from pyro_rnp.training.distributed import SyncedBatchNorm
        torch.manual_seed(0)
        batch = torch.randn(2 * world, 3, 5, 5) * 4 + 100  # large mean: E[x^2] - mean^2 is fragile in bf16
        norm = SyncedBatchNorm(3)
        with torch.autocast(**BF16):
            y = norm(batch[2 * rank:2 * rank + 2].bfloat16())
        torch.save((y.float(), norm.running_var), os.path.join(out, f"norm{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_synced_batch_norm_computes_its_statistics_in_float32(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_synced_norm_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    batch = torch.randn(4, 3, 5, 5) * 4 + 100
    reference = torch.nn.BatchNorm2d(3)
    expected = reference(batch.bfloat16().float())
    for rank in (0, 1):
        y, running_var = torch.load(tmp_path / f"norm{rank}.pt")
        assert torch.isfinite(y).all()
        assert torch.allclose(y, expected[2 * rank:2 * rank + 2], atol=0.05)
        assert torch.allclose(running_var, reference.running_var, rtol=1e-3)


def test_rng_states_come_back_from_a_checkpoint(tmp_path):
    from pyro_rnp.training.runs import load_checkpoint, save_checkpoint, set_rng_state, write_config
    rnp = RNP(tiny_config())
    write_config(tmp_path, rnp.config)
    torch.manual_seed(5)
    save_checkpoint(tmp_path, rnp, None, epoch=0, step=0, batch_in_epoch=0, wall_time_s=0.0)
    expected = torch.rand(3)
    torch.rand(10)
    set_rng_state(load_checkpoint(tmp_path, map_location="cpu")["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_validation_is_off_inside_the_step_on_cuda_and_across_processes(fashion_images, monkeypatch):
    """Where one process's validation error would leave the others in DDP's all-reduce, and on CUDA,
    the step turns validation off; on one CPU process it follows the global setting (on in tests)."""
    from pyro_rnp.training.distributed import Context
    from pyro.distributions.util import is_validation_enabled

    from pyro_rnp.training.step import validates_inside
    assert validates_inside(torch.device("cpu"), Context())
    assert not validates_inside(torch.device("cuda"), Context())
    assert not validates_inside(torch.device("cpu"), Context(rank=1, world=2))
    seen = []
    rnp = RNP(tiny_config())
    step = TrainStep(rnp, make_optimizer(rnp, 1e-3))
    original = step.loss.forward
    monkeypatch.setattr(step.loss, "forward", lambda x: seen.append(is_validation_enabled()) or original(x))
    step(fashion_images[:4])
    monkeypatch.setattr("pyro_rnp.training.step.validates_inside", lambda device, context: False)
    step(fashion_images[:4])
    assert seen == [True, False]
