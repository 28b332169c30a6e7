"""Observation models p(x | canvas). Every reported number says which one it is under."""
from __future__ import annotations

import pyro.distributions as dist
import torch

from .precision import full_precision


class NormalLikelihood:
    """x ~ Normal(canvas, sigma) per pixel. sigma = 0.5 is what the authors' loss amounts to."""

    def __init__(self, scale: float = 0.5):
        self.scale = scale
        self.name = f"normal(sigma={scale:g})"

    def distribution(self, canvas: torch.Tensor) -> dist.Distribution:
        # the scale as a tensor filled on the device: a Python float would be copied from the host
        return dist.Normal(canvas, canvas.new_full((), self.scale)).to_event(3)

    def observation(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def mean(self, canvas: torch.Tensor) -> torch.Tensor:
        return canvas

    def part_error(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image penalty for a part guess: the same squared-error scale as the likelihood."""
        return (prediction - target).pow(2).flatten(1).sum(1) / (2 * self.scale ** 2)


class BernoulliLikelihood:
    """Binarised pixels (x > 0.5) ~ Bernoulli(1 - exp(-canvas)).

    The canvas is a sum of non-negative patches, so it is read as ink density:
    more ink saturates towards probability 1, with no dead zone for the gradient.
    """

    name = "bernoulli(x>0.5)"
    eps = 1e-6

    def probs(self, canvas: torch.Tensor) -> torch.Tensor:
        return (-torch.expm1(-canvas)).clamp(self.eps, 1 - self.eps)

    def distribution(self, canvas: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(probs=self.probs(canvas)).to_event(3)

    def observation(self, x: torch.Tensor) -> torch.Tensor:
        return (x > 0.5).to(x.dtype)

    def mean(self, canvas: torch.Tensor) -> torch.Tensor:
        return self.probs(canvas)

    def part_error(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the part guess against the target, per image, in at least float32: written
        out rather than ``F.binary_cross_entropy``, which CUDA autocast refuses (p is clamped away
        from 0 and 1, so the logs are finite)."""
        p, t = self.probs(full_precision(prediction)), full_precision(target).clamp(0, 1)
        return -(t * torch.log(p) + (1 - t) * torch.log1p(-p)).flatten(1).sum(1)


def make_likelihood(name: str, scale: float = 0.5):
    if name == "normal":
        return NormalLikelihood(scale)
    if name == "bernoulli":
        return BernoulliLikelihood()
    raise ValueError(f"unknown likelihood {name!r}; choose normal or bernoulli")
