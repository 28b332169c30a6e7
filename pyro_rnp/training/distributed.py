"""Training on several processes: torch.distributed under torchrun, one process per device.

    torchrun --nproc_per_node N -m pyro_rnp.fit ...

Every process builds the same model from the same seed, wraps the ELBO in
DistributedDataParallel, and takes its own shard of every global batch: the
epoch's permutation (from seed and epoch, as DistributedSampler with set_epoch
makes it) is cut into global batches of N x --batch-size images, and process r
takes the r-th slice of each. Each process's loss is the ELBO summed over its
shard, times N, so that DDP's average of gradients is the gradient of the ELBO
summed over the global batch: the same update a single process makes on the
global batch. The encoder's batch norms compute their statistics over the global
batch (``SyncedBatchNorm``), so that equivalence is exact up to the sampled noise
and floating point. Rank 0 alone writes the run folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..model.precision import full_precision


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> tuple[Context, torch.device]:
    """Join the process group torchrun set up (nccl on CUDA, gloo on CPU); one device per process."""
    if not launched_by_torchrun():
        return Context(), device
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend()), device


def teardown(context: Context) -> None:
    if context.active and dist.is_initialized():
        dist.destroy_process_group()


def sum_across(context: Context, *values: float, device=None) -> list[float]:
    """Each value summed over all processes (metrics: totals, then divide)."""
    if not context.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_across(context: Context, flag: bool, device=None) -> bool:
    """Whether any process raised ``flag`` (a stop request, a non-finite loss): all then act alike."""
    if not context.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def broadcast_from_main(context: Context, value):
    """Rank 0's value of a picklable object, on every process (a run folder's name)."""
    if not context.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(context: Context) -> None:
    if context.active:
        dist.barrier()


def shard(order: torch.Tensor, batch: int, per_process: int, context: Context) -> torch.Tensor:
    """Indices of this process's part of global batch ``batch`` of the permutation ``order``."""
    start = batch * per_process * context.world + context.rank * per_process
    return order[start:start + per_process]


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm with statistics over the global batch of all processes, on any backend.

    torch's SyncBatchNorm needs CUDA; this one sums counts, sums and sums of squares with
    a differentiable all-reduce, so it also runs on CPU with gloo. Outside a process group
    it is an ordinary batch norm. State-dict keys are those of BatchNorm1d/2d.
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        # statistics in at least float32 (under bfloat16 autocast, counts are inexact and E[x^2] - mean^2
        # can fall below zero); the count is filled on the device, not copied from the host
        x32 = full_precision(x)
        count = x32.new_full((1,), float(x.numel() // x.shape[1]))
        stats = torch.cat([x32.sum(dims), (x32 * x32).sum(dims), count])
        stats = _AllReduceSum.apply(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x32 - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum over processes is the sum of the processes' gradients.

    On the default process group, the one DDP's gradient buckets use: every process runs its
    backward pass in the same order, so these all-reduces and DDP's are issued in the same order
    everywhere on one communicator (a second communicator with operations in flight beside DDP's
    can deadlock when processes order them differently)."""

    @staticmethod
    def forward(ctx, x):
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sync_batch_norms(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d in ``module`` by a SyncedBatchNorm holding the same state."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            synced = SyncedBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            synced.to(next(child.buffers()).device)
            setattr(module, name, synced)
        else:
            sync_batch_norms(child)
    return module


class ELBOLoss(nn.Module):
    """The training loss as a module, so DistributedDataParallel can wrap it (as Pyro's ELBO
    modules are meant to be): -ELBO plus the part regulariser, summed over the batch, times
    ``scale`` (the number of processes)."""

    def __init__(self, rnp: nn.Module, elbo, scale: float = 1.0):
        super().__init__()
        self.rnp = rnp
        self.elbo = elbo
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.elbo.differentiable_loss(self.rnp.model, self.rnp.guide, x) * self.scale

