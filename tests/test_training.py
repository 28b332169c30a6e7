"""Training stability: schedules, divergence detection, and never saving a diverged model."""
import gc
import subprocess
import sys

import pyro
import pytest
import torch

from conftest import SHARED_DATA, tiny_config
from pyro_rnp import RNP
from pyro_rnp.cli import TrainingError
from pyro_rnp.fit import train
from pyro_rnp.training.runs import RunError, load_checkpoint, save_checkpoint
from pyro_rnp.training import TrainStep, make_optimizer


def test_warmup_then_cosine_schedule():
    rnp = RNP(tiny_config())
    step = TrainStep(rnp, make_optimizer(rnp, 1e-3), warmup_steps=10, schedule="cosine", total_steps=110)
    assert step.lr_scale(0) == pytest.approx(0.1)
    assert step.lr_scale(9) == pytest.approx(1.0)
    assert step.lr_scale(60) == pytest.approx(0.5)
    assert step.lr_scale(110) == pytest.approx(0.0, abs=1e-9)
    constant = TrainStep(rnp, make_optimizer(rnp, 1e-3), warmup_steps=10)
    assert constant.lr_scale(1000) == 1.0


def test_a_non_finite_batch_is_skipped_not_applied(fashion_images):
    rnp = RNP(tiny_config())
    step = TrainStep(rnp, make_optimizer(rnp, 1e-3))
    before = {k: v.clone() for k, v in rnp.state_dict().items()}
    x = fashion_images[:8].clone()
    x[0, 0, 0, 0] = float("nan")
    _, applied = step(x)
    assert not applied
    for k, v in rnp.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_divergence_stops_with_a_clear_error(tmp_path):
    config = tiny_config(lr=1e3, grad_clip=0, limit=64, epochs=5, eval_limit=16)
    with pytest.raises(TrainingError, match="diverged.*lower --lr"):
        train(config, tmp_path / "run", torch.device("cpu"), SHARED_DATA, download=False, progress=False)


def test_a_diverged_model_never_overwrites_a_good_checkpoint(tmp_path):
    rnp = RNP(tiny_config())
    optimizer = make_optimizer(rnp, 1e-3)
    (tmp_path / "config.json").write_text('{"config": %s}' % __import__("json").dumps(rnp.config.to_dict()))
    save_checkpoint(tmp_path, rnp, optimizer, epoch=1, step=10, batch_in_epoch=0, wall_time_s=1.0)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        rnp.executor.hypernet.head[0, 0] = float("nan")
    with pytest.raises(RunError, match="non-finite"):
        save_checkpoint(tmp_path, rnp, optimizer, epoch=2, step=20, batch_in_epoch=0, wall_time_s=2.0)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert load_checkpoint(tmp_path)["step"] == 10


def test_the_head_learns_at_its_own_rate():
    rnp = RNP(tiny_config())
    optimizer = make_optimizer(rnp, 1e-3, head_lr_scale=0.125)
    head_group = [g for g in optimizer.param_groups if any(p is rnp.executor.hypernet.head for p in g["params"])]
    assert len(head_group) == 1 and head_group[0]["lr"] == pytest.approx(1.25e-4)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(rnp.parameters()))
    step = TrainStep(rnp, optimizer, warmup_steps=10)
    step.set_lr_for(4)  # half-way through the warm-up: both rates scale together
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([0.625e-4, 5e-4])


def test_bf16_autocast_step_keeps_float32_state_and_the_loss(fashion_images):
    """The loss of a bf16 step is the float32 loss to within bfloat16 rounding (tests/test_cpu_bf16.py
    checks the gradients)."""
    x = fashion_images[:8]
    torch.manual_seed(0)
    rnp = RNP(tiny_config()).train()
    pyro.set_rng_seed(0)
    with torch.no_grad():
        fp32 = TrainStep(rnp, make_optimizer(rnp, 1e-3)).loss(x)
    step = TrainStep(rnp, make_optimizer(rnp, 1e-3), amp="bf16")
    pyro.set_rng_seed(0)
    loss, applied = step(x)
    assert bool(applied)
    assert abs(loss.item() - fp32.item()) / fp32.item() < 0.01
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in rnp.parameters() if p.grad is not None)


def _alive(kind) -> int:
    gc.collect()
    return sum(isinstance(o, kind) for o in gc.get_objects())


def test_steps_and_evaluation_leave_no_programs_behind(fashion_images):
    """Generated programs and their graph nodes go when a step or an evaluation is done: a
    reference cycle through autograd's C++ nodes once kept every step's (3 MB a step)."""
    from pyro_rnp.fast import FastPrograms, TrainingPass
    rnp = RNP(tiny_config())
    step = TrainStep(rnp, make_optimizer(rnp, 1e-3))
    before = _alive(FastPrograms), _alive(TrainingPass)
    for _ in range(3):
        step(fashion_images[:8])
    rnp.parse(fashion_images[:4])
    step.loss(fashion_images[:4])  # a forward pass with gradients on and no backward
    assert (_alive(FastPrograms), _alive(TrainingPass)) == before == (0, 0)


_PROCESS = """
import gc, sys, torch
from pyro_rnp import RNP, RNPConfig
from pyro_rnp.fast import prepare_process_for_training
from pyro_rnp.training import TrainStep, make_optimizer
rnp = RNP(RNPConfig(z_dim=8, hidden=16, embed=8, action_hidden=8, steps=2, encoder_blocks=1, encoder_hidden=16))
before = gc.get_freeze_count()
step = TrainStep(rnp, make_optimizer(rnp, 1e-3))
step(torch.rand(4, 1, 28, 28))
built = gc.get_freeze_count()
prepare_process_for_training()
frozen = gc.get_freeze_count()
prepare_process_for_training()
step(torch.rand(4, 1, 28, 28))
print(before, built, frozen, gc.get_freeze_count())
"""


def test_only_the_entry_point_changes_the_process_and_only_once():
    """Building and running a TrainStep leaves the garbage collector alone; the entry point's
    prepare_process_for_training freezes the objects alive then out of full collections, once per
    process, and hands them back at exit, so nothing reports leaks at shutdown."""
    out = subprocess.run([sys.executable, "-c", _PROCESS], capture_output=True, text=True, check=True)
    before, built, frozen, after = map(int, out.stdout.split())
    assert before == built == 0
    assert frozen > 10_000 and after <= frozen  # objects freed since only leave it
    assert "leak" not in out.stderr.lower(), out.stderr[-2000:]


def test_a_curriculum_trains_depth_1_then_depth_2_from_its_weights(tmp_path):
    """Stage 1 of a curriculum is a depth-1 run (same seed: the same weights after it); stage 2 trains
    those weights at depth 2, and the run ends as a depth-2 model."""
    from pyro_rnp.analysis.evaluate import evaluate
    from pyro_rnp.training.run import train_run
    from pyro_rnp.training.runs import read_metrics
    cpu = torch.device("cpu")
    seen = []  # (depth trained, weights) at each epoch's end

    def scores(model, images):
        return evaluate(model, images, device=cpu, progress=False)

    def record(model, run_dir, x):
        seen.append((model.executor.depth, {k: v.clone() for k, v in model.state_dict().items()}))

    common = dict(dataset="fashion", limit=64, eval_limit=16, figure_every=1)
    shallow = train_run(tiny_config(depth=1, epochs=1, **common), tmp_path / "depth1", cpu, scores,
                        data_dir=SHARED_DATA, download=False, progress=False)
    staged = train_run(tiny_config(depth=2, epochs=2, curriculum_epochs=1, **common), tmp_path / "curriculum",
                       cpu, scores, record, data_dir=SHARED_DATA, download=False, progress=False)
    assert [depth for depth, _ in seen] == [1, 2]
    assert [m["depth"] for m in read_metrics(tmp_path / "curriculum")] == [1, 2]
    stage1, stage2 = seen[0][1], seen[1][1]
    for name, value in shallow.model.state_dict().items():
        assert torch.allclose(value, stage1[name], atol=1e-5), name
    assert not torch.equal(stage1["executor.hypernet.head"], stage2["executor.hypernet.head"])
    assert staged.model.executor.depth == 2


def test_a_curriculum_schedule_and_its_refusals():
    config = tiny_config(depth=3, epochs=5, curriculum_epochs=2)
    assert [config.depth_in_epoch(e) for e in range(5)] == [1, 1, 2, 2, 3]
    assert [tiny_config(epochs=3).depth_in_epoch(e) for e in range(3)] == [2, 2, 2]
    with pytest.raises(ValueError, match="leaves no epoch at the full depth"):
        tiny_config(depth=2, epochs=2, curriculum_epochs=2)
    with pytest.raises(ValueError, match="needs the rnp model at depth 2"):
        tiny_config(depth=1, epochs=3, curriculum_epochs=1)
    with pytest.raises(ValueError, match="needs the rnp model"):
        tiny_config(model="vae", epochs=3, curriculum_epochs=1)
