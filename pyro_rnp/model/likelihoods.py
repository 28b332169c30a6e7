"""Observation models p(x | canvas). Every reported number says which one it is under.

    normal                x ~ Normal(canvas, sigma), sigma fixed (``likelihood_scale``; 0.5 is the paper's loss)
    normal-learned        the same with sigma one learned scalar (starting at ``likelihood_scale``)
    normal-pixel          the same with a learned sigma per pixel (each starting at ``likelihood_scale``)
    laplace               x ~ Laplace(canvas, b), b one learned scalar (starting at ``likelihood_scale``)
    continuous-bernoulli  x ~ ContinuousBernoulli(1 - exp(-canvas)) for grey levels in [0, 1]
                          (Loaiza-Ganem and Cunningham 2019: the normalised density on [0, 1])
    bernoulli             binarised pixels ~ Bernoulli(1 - exp(-canvas))

Each is a density on the data's own space, so their bounds in nats compare only within one
space: the continuous ones on grey levels, the Bernoulli on binary images. The learned scales
are parameters of a ``nn.Module`` likelihood: a model that holds one (``self.likelihood``) owns
them, so they train, checkpoint and load with it; ``register`` names them to Pyro.
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn

from .precision import full_precision


def ink_probability(canvas: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - exp(-canvas), clamped into (0, 1): the canvas, a sum of non-negative patches, read as ink
    density, so that more ink saturates towards 1 with no dead zone for the gradient."""
    return (-torch.expm1(-canvas)).clamp(eps, 1 - eps)


class CanvasMean:
    """A likelihood of the grey levels themselves whose mean is the canvas: the Normal and Laplace ones."""

    def observation(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def mean(self, canvas: torch.Tensor) -> torch.Tensor:
        return canvas


class NormalLikelihood(CanvasMean):
    """x ~ Normal(canvas, sigma) per pixel. sigma = 0.5 is what the authors' loss amounts to."""

    def __init__(self, scale: float = 0.5):
        self.scale = scale
        self.name = f"normal(sigma={scale:g})"

    def distribution(self, canvas: torch.Tensor) -> dist.Distribution:
        # the scale as a tensor filled on the device: a Python float would be copied from the host
        return dist.Normal(canvas, canvas.new_full((), self.scale)).to_event(3)

    def part_error(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image penalty for a part guess: the same squared-error scale as the likelihood."""
        return (prediction - target).pow(2).flatten(1).sum(1) / (2 * self.scale ** 2)


class LearnedNormalLikelihood(CanvasMean, nn.Module):
    """x ~ Normal(canvas, sigma) per pixel with sigma learned: one scalar, or one per pixel
    (``per_pixel``, shape (1, S, S)), stored as its log and starting at ``scale``."""

    def __init__(self, scale: float = 0.5, image_size: int = 28, per_pixel: bool = False):
        super().__init__()
        shape = (1, image_size, image_size) if per_pixel else ()
        self.log_scale = nn.Parameter(torch.full(shape, math.log(scale)))
        self.name = "normal(sigma learned per pixel)" if per_pixel else "normal(sigma learned)"

    def sigma(self) -> torch.Tensor:
        return self.log_scale.exp()

    def distribution(self, canvas: torch.Tensor) -> dist.Distribution:
        return dist.Normal(canvas, self.sigma().to(canvas.dtype).expand(canvas.shape)).to_event(3)

    def part_error(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Squared error at the current sigma, held constant: the part term is a penalty without the
        density's normaliser, and a sigma it could move would grow to silence it."""
        return ((prediction - target).pow(2) / (2 * self.sigma().detach() ** 2)).flatten(1).sum(1)


class LaplaceLikelihood(CanvasMean, nn.Module):
    """x ~ Laplace(canvas, b) per pixel with b one learned scalar (its log, starting at ``scale``)."""

    def __init__(self, scale: float = 0.5):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.name = "laplace(b learned)"

    def distribution(self, canvas: torch.Tensor) -> dist.Distribution:
        return dist.Laplace(canvas, self.log_scale.exp().to(canvas.dtype).expand(canvas.shape)).to_event(3)

    def part_error(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Absolute error at the current b, held constant (as LearnedNormalLikelihood's)."""
        return (prediction - target).abs().flatten(1).sum(1) / self.log_scale.detach().exp()


class ContinuousBernoulliLikelihood:
    """Grey levels x in [0, 1] ~ ContinuousBernoulli(lambda = 1 - exp(-canvas)) per pixel.

    Its mean is not lambda: ``mean`` returns the distribution's mean, which is what ``reconstruct``
    and ``sample`` draw. Computed in at least float32 (the normaliser's log is unstable near
    lambda = 1/2 in lower precision)."""

    name = "continuous-bernoulli"

    def distribution(self, canvas: torch.Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(probs=ink_probability(full_precision(canvas))).to_event(3)

    def observation(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0, 1)

    def mean(self, canvas: torch.Tensor) -> torch.Tensor:
        return dist.ContinuousBernoulli(probs=ink_probability(full_precision(canvas))).mean

    def part_error(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-log density of the target's grey levels under the part guess, per image."""
        probs = ink_probability(full_precision(prediction))
        return -dist.ContinuousBernoulli(probs=probs).log_prob(full_precision(target).clamp(0, 1)).flatten(1).sum(1)


class BernoulliLikelihood:
    """Binarised pixels (x > 0.5) ~ Bernoulli(1 - exp(-canvas)) (``ink_probability``).

    Data that are already binary (``--binarize dynamic``) pass through the threshold unchanged.
    """

    name = "bernoulli(x>0.5)"

    def probs(self, canvas: torch.Tensor) -> torch.Tensor:
        return ink_probability(canvas)

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


def make_likelihood(name: str, scale: float = 0.5, image_size: int = 28):
    """The likelihood ``name`` (the module docstring's table); ``scale`` is the fixed or starting sigma or b."""
    if name == "normal":
        return NormalLikelihood(scale)
    if name in ("normal-learned", "normal-pixel"):
        return LearnedNormalLikelihood(scale, image_size, per_pixel=name == "normal-pixel")
    if name == "laplace":
        return LaplaceLikelihood(scale)
    if name == "continuous-bernoulli":
        return ContinuousBernoulliLikelihood()
    if name == "bernoulli":
        return BernoulliLikelihood()
    raise ValueError(f"unknown likelihood {name!r}; choose one of normal, normal-learned, normal-pixel, laplace, "
                     "continuous-bernoulli, bernoulli")


def register(likelihood) -> None:
    """Name a likelihood's learned scales to Pyro's parameter store (inside a model); one without
    parameters has nothing to register."""
    if isinstance(likelihood, nn.Module):
        pyro.module("likelihood", likelihood)
