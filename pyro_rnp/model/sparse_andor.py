"""The sparse AND-OR generator (Xing, Wu, Zhu, Wu): a convolutional generator made interpretable by
top-k sparsity, learned without an encoder by alternating back-propagation.

Model, per image (``model``):

    z ~ Normal(0, I_{z_dim})                         site "z", in the "data" plate
    x ~ likelihood(g(z))                             site "x" (Normal(g(z), sigma) per pixel)

The generator g, scaled from the paper's 64x64 colour table to C x C grey images (S = C):

    | layer | what                                                   | top-k sparsity (``sparsity="top-k"``)       |
    | 1     | fully connected z -> 4w x ceil(S/4) x ceil(S/4)         | at each position, the k_fc largest channels  |
    | 2     | conv 3x3 4w, conv 3x3 4w at ceil(S/4)                   | in each channel, a quarter of the positions |
    | 3     | nearest x2, conv 3x3 2w, conv 3x3 2w at ceil(S/2)       | in each channel, a quarter of the positions |
    | 4     | nearest x2, conv 3x3 w, conv 3x3 w at S                 | none (as the paper's last block)             |
    | out   | conv 3x3 1, linear (``andor_output``; or a sigmoid, the paper's tanh for [0, 1] pixels) |             |

(w = ``andor_width``; the paper's 4x4 -> 64x64 has four upsamplings and three sparse conv
blocks, ours 7 -> 28 (13 -> 50) two and two; its k at each conv block is a quarter of the
positions, which ``andor_k_fraction`` keeps.) Every activation is a ReLU followed by the
layer's top-k: the kept units pass their values and gradients, the others are zero. The output is
linear by default (``andor_output``, ours): under a Normal likelihood the sigmoid's gradient vanishes
once a pixel saturates, and the dense ablation drove every pixel there (to black) within 20 steps at
the quick preset's rate, so that the ablation would compare a trained network with a dead one.

Learning (the paper's Algorithm 1): every training image keeps its own latent (``train_latents``,
persistent across epochs); a step runs ``langevin_steps`` of

    z <- z + (delta^2 / 2) d/dz log p(z, x) + delta * eps,        eps ~ N(0, I)

on the batch's latents, with log p(z, x) read from this module's Pyro model (``log_joint``),
stores them, and takes one Adam step of the generator on -log p(z, x) at those latents
(pyro_rnp/training/step.py, ``AlternatingBackpropStep``). With ``andor_critic`` the paper's
energy-based critic E (``EnergyCritic``) learns in the same step to give observed images lower
energy than images generated from fresh z ~ N(0, I), and the generator's loss adds
``critic_weight`` times E of those generated images.

The guide is not amortized: for held-out images it climbs log p(z, x) from a prior draw with
``infer_steps`` of Adam (``infer_lr``; from scratch, fixed-step Langevin climbs far more slowly),
then runs ``proposal_samples`` Langevin steps from there and returns q(z | x) = Normal(the
latent found, the states' root-mean-square distance from it), one Gaussian per image around
the inferred latent. Any proposal
gives an importance-sampling bound, so evaluate's -ELBO and IWAE are honest bounds on
-log p(x) (tests check them against a linear-Gaussian generator's exact likelihood).
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro import poutine

from .config import ANDOR_OUTPUTS, RNPConfig
from .likelihoods import make_likelihood, register as register_likelihood


def top_k_channels(h: torch.Tensor, k: int) -> torch.Tensor:
    """h (N, C, H, W) with, at every position, all but the k largest of the C channel entries zeroed.
    The mask is a constant: gradients reach only the kept entries."""
    if k >= h.shape[1]:
        return h
    mask = torch.zeros_like(h).scatter_(1, h.topk(k, dim=1).indices, 1.0)
    return h * mask


def top_k_positions(h: torch.Tensor, k: int) -> torch.Tensor:
    """h (N, C, H, W) with, in every channel, all but its k largest positions zeroed (gradients reach
    only the kept ones)."""
    n, c, height, width = h.shape
    if k >= height * width:
        return h
    flat = h.reshape(n, c, height * width)
    mask = torch.zeros_like(flat).scatter_(2, flat.topk(k, dim=2).indices, 1.0)
    return (flat * mask).reshape(n, c, height, width)


class SparseGenerator(nn.Module):
    """g(z): (*B, z_dim) -> (*B, 1, S, S), the table in the module docstring (in (0, 1) with output "sigmoid").

    ``LAYERS`` names what the figures draw: layer 1 (the fully connected map), 2 and 3 (the
    sparse conv blocks), 4 (the dense block). ``forward_from(layer, h)`` runs the layers after
    ``layer`` on its activation h, so a single active unit can be drawn."""

    LAYERS = (1, 2, 3, 4)

    def __init__(self, z_dim: int, image_size: int, width: int, sparse: bool, k_fc: int, k_fraction: float,
                 output: str = "linear"):
        super().__init__()
        if output not in ANDOR_OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(ANDOR_OUTPUTS)}, not {output!r}")
        self.z_dim, self.image_size, self.sparse, self.output = z_dim, image_size, sparse, output
        self.sizes = (math.ceil(image_size / 4), math.ceil(image_size / 2), image_size)
        self.channels = (4 * width, 4 * width, 2 * width, width)
        self.k_fc = k_fc
        self.k_positions = tuple(max(1, round(k_fraction * s * s)) for s in self.sizes[:2])
        s0 = self.sizes[0]
        self.fc = nn.Linear(z_dim, self.channels[0] * s0 * s0)
        self.block2 = nn.ModuleList([nn.Conv2d(self.channels[0], self.channels[1], 3, padding=1),
                                     nn.Conv2d(self.channels[1], self.channels[1], 3, padding=1)])
        self.block3 = nn.ModuleList([nn.Conv2d(self.channels[1], self.channels[2], 3, padding=1),
                                     nn.Conv2d(self.channels[2], self.channels[2], 3, padding=1)])
        self.block4 = nn.ModuleList([nn.Conv2d(self.channels[2], self.channels[3], 3, padding=1),
                                     nn.Conv2d(self.channels[3], self.channels[3], 3, padding=1)])
        self.out = nn.Conv2d(self.channels[3], 1, 3, padding=1)

    def _block(self, convs: nn.ModuleList, h: torch.Tensor, k: int | None) -> torch.Tensor:
        for conv in convs:
            h = F.relu(conv(h))
            if self.sparse and k is not None:
                h = top_k_positions(h, k)
        return h

    def layer1(self, z: torch.Tensor) -> torch.Tensor:
        """(N, z_dim) -> the fully connected layer's activation (N, 4w, S/4, S/4)."""
        s0 = self.sizes[0]
        h = F.relu(self.fc(z)).reshape(-1, self.channels[0], s0, s0)
        return top_k_channels(h, self.k_fc) if self.sparse else h

    def next_layer(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The activation of layer ``layer + 1`` (2, 3 or 4) from that of ``layer``."""
        if layer == 1:
            return self._block(self.block2, h, self.k_positions[0])
        if layer == 2:
            return self._block(self.block3, F.interpolate(h, size=self.sizes[1], mode="nearest"), self.k_positions[1])
        return self._block(self.block4, F.interpolate(h, size=self.sizes[2], mode="nearest"), None)

    def forward_from(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The image (N, 1, S, S) that the layers after ``layer`` draw from its activation h."""
        for above in range(layer, self.LAYERS[-1]):
            h = self.next_layer(above, h)
        image = self.out(h)
        return torch.sigmoid(image) if self.output == "sigmoid" else image

    def activations(self, z: torch.Tensor) -> dict[int, torch.Tensor]:
        """Every layer's activation for z (N, z_dim): {layer: (N, C_l, S_l, S_l)}."""
        found = {1: self.layer1(z)}
        for layer in self.LAYERS[1:]:
            found[layer] = self.next_layer(layer - 1, found[layer - 1])
        return found

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]
        image = self.forward_from(1, self.layer1(z.reshape(-1, self.z_dim)))
        return image.reshape(*batch, 1, self.image_size, self.image_size)


class EnergyCritic(nn.Module):
    """The paper's energy-based critic E(x): (*B, 1, S, S) -> (*B,), scaled as the generator is: conv 3x3 w, then
    [avg-pool /2, conv 3x3 c, conv 3x3 c] for c = 2w, 4w, then a fully connected layer to one number;
    LeakyReLU 0.2 (the paper's: conv 64, then blocks of 64, 128, 256, 512 channels at 64x64)."""

    def __init__(self, image_size: int, width: int):
        super().__init__()
        self.image_size = image_size
        act = nn.LeakyReLU(0.2)
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1), act]
        side, channels = image_size, width
        for out in (2 * width, 4 * width):
            layers += [nn.AvgPool2d(2), nn.Conv2d(channels, out, 3, padding=1), act,
                       nn.Conv2d(out, out, 3, padding=1), act]
            side, channels = side // 2, out
        self.features = nn.Sequential(*layers, nn.AvgPool2d(2), nn.Flatten())
        self.energy = nn.Linear(channels * (side // 2) ** 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[:-3]
        return self.energy(self.features(x.reshape(-1, 1, self.image_size, self.image_size))).reshape(batch)


class SparseAndOr(nn.Module):
    """The model above; implements the model protocol of registry.py with objective
    "alternating_backprop" (no amortized guide: its guide infers each image by Langevin)."""

    objective = "alternating_backprop"
    # images evaluated at once: the guide's Langevin inference costs the same whatever the number of
    # importance samples, and is run once per batch of images (``infer`` remembers its last answer)
    evaluation_batch = 64

    def __init__(self, config: RNPConfig):
        super().__init__()
        self.config = c = config
        self.z_dim = c.z_dim
        self.generator = SparseGenerator(c.z_dim, c.image_size, c.andor_width, c.sparsity == "top-k",
                                         c.andor_k_fc, c.andor_k_fraction, c.andor_output)
        self.critic = EnergyCritic(c.image_size, c.andor_width) if c.andor_critic else None
        self.likelihood = make_likelihood(c.likelihood, c.likelihood_scale, c.image_size)
        # one latent per training image, persistent across epochs; sized by the training step
        self.register_buffer("train_latents", torch.zeros(0, c.z_dim))
        self._last_inference: tuple | None = None   # (x, its version, the generator's versions, (loc, scale))

    # --- Pyro model and its log density ---------------------------------------------------------
    def model(self, x: torch.Tensor | None = None, batch_size: int | None = None, part_term: bool = True):
        """Generative model for a batch x (B, 1, S, S); with x=None it generates batch_size images.
        ``part_term`` is accepted for the protocol (this model has no part-level term)."""
        pyro.module("andor_generator", self.generator)
        register_likelihood(self.likelihood)
        n = batch_size if x is None else x.shape[0]
        if n is None:
            raise ValueError("pass images x or a batch_size")
        zero = self.generator.fc.weight.new_zeros(())
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(zero, 1.0).expand([self.z_dim]).to_event(1))
            obs = None if x is None else self.likelihood.observation(x)
            return pyro.sample("x", self.likelihood.distribution(self.generator(z)), obs=obs)

    def log_joint(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(z, x) per image, (B,), read from the Pyro model's trace with "z" set to z (B, z_dim)."""
        with poutine.block():
            trace = poutine.trace(poutine.condition(self.model, data={"z": z})).get_trace(x)
        trace.compute_log_prob()
        return sum(site["log_prob"] for site in trace.nodes.values() if site["type"] == "sample")

    def langevin(self, z: torch.Tensor, x: torch.Tensor, steps: int, noise: bool = True) -> torch.Tensor:
        """``steps`` Langevin updates of z (B, z_dim) on log p(z, x) with step size config.langevin_step_size
        (noise=False: gradient ascent with the same step). The generator's gradients are untouched.

        Each latent's drift (delta^2 / 2) grad is shortened to at most config.langevin_max_drift in norm when
        that is set: with a linear output the generator is piecewise linear in z, and a fixed-step update
        whose drift overshoots the mode grows geometrically (guides/sparse-andor.md); a bounded drift keeps
        such a latent within reach of its mode."""
        c = self.config
        delta = c.langevin_step_size
        z = z.detach()
        with torch.enable_grad():
            for _ in range(steps):
                z.requires_grad_(True)
                (grad,) = torch.autograd.grad(self.log_joint(z, x).sum(), z)
                drift = 0.5 * delta ** 2 * grad
                if c.langevin_max_drift is not None:
                    norm = drift.norm(dim=-1, keepdim=True)
                    drift = drift * (c.langevin_max_drift / norm.clamp_min(c.langevin_max_drift))
                z = z.detach() + drift
                if noise:
                    z = z + delta * torch.randn_like(z)
        return z.detach()

    def find_mode(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        """(B, z_dim): ``steps`` of Adam at rate config.infer_lr on -log p(z, x) from a draw of the prior, per
        image (the images' terms are separate, so the summed loss gives each latent its own gradient).

        Not from z = 0: once the fully connected layer's biases are negative, every unit is off at z = 0 and
        its gradient is exactly zero there, so Adam never leaves it (guides/sparse-andor.md: a quick run got
        there). Training's persistent latents start from the prior too."""
        z = torch.randn(x.shape[0], self.z_dim, device=x.device, dtype=x.dtype).requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=self.config.infer_lr)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad()
                (grad,) = torch.autograd.grad(-self.log_joint(z, x).sum(), z)
                z.grad = grad
                optimizer.step()
        return z.detach()

    def infer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out inference of the guide: (loc, scale), each (B, z_dim): loc is ``find_mode``'s latent
        after ``infer_steps``, scale the root-mean-square distance from it of ``proposal_samples`` Langevin
        states started there (centred at the mode rather than at the states' mean, which drifts off it
        under the training's step size and gave a looser bound: guides/sparse-andor.md).

        Asked again for the same tensor x (the same object, unmodified) while the generator is unchanged, it
        returns its last answer: evaluation asks the guide for every chunk of importance samples and then
        ``reconstruct`` for the same images."""
        versions = tuple(p._version for p in self.generator.parameters())
        last = self._last_inference
        if last is not None and last[0] is x and last[1] == x._version and last[2] == versions:
            return last[3]
        c = self.config
        z = self.find_mode(x, c.infer_steps)
        states = []
        for _ in range(c.proposal_samples):
            z = self.langevin(z, x, 1)
            states.append(z)
        spread = (torch.stack(states) - z).pow(2).mean(0).sqrt()
        result = z, spread.clamp_min(1e-3)
        self._last_inference = (x, x._version, versions, result)
        return result

    def guide(self, x: torch.Tensor | None = None, batch_size: int | None = None, part_term: bool = True):
        """q(z | x) = Normal(loc, scale) per image from ``infer`` (not amortized: no parameters of its own)."""
        if x is None:
            raise ValueError("the guide needs images x")
        loc, scale = self.infer(x)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # --- the model protocol's analysis methods ----------------------------------------------------
    def ensure_train_latents(self, n: int) -> None:
        """Give each of n training images a latent drawn from the prior, unless there are n already."""
        if self.train_latents.shape[0] != n:
            self.train_latents = torch.randn(n, self.z_dim, device=self.train_latents.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the persistent latents are as many as the run's training images: take the saved shape
        saved = state_dict.get(prefix + "train_latents")
        if saved is not None:
            self.train_latents = torch.empty_like(saved, device=self.train_latents.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The guide's single latent per image (B, z_dim): the mode held-out inference finds (``infer``)."""
        return self.infer(x)[0]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean image at the inferred latent (the proposal's mean)."""
        return self.likelihood.mean(self.generator(self.infer(x)[0]))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        device = self.generator.fc.weight.device
        return self.likelihood.mean(self.generator(torch.randn(n, self.z_dim, device=device)))

    @torch.no_grad()
    def basis_functions(self, layer: int, images: torch.Tensor, units: int | None = None,
                        in_context: bool = False) -> torch.Tensor:
        """What a single active unit of ``layer`` draws: (C_l or ``units``, 1, S, S), one drawing per
        channel, the channels in order of strength (their mean largest activation over ``images``, at
        the images' inferred latents) when ``units`` is given.

        Alone (the default): the layer's map is zero except channel c at the map's centre, set to the
        channel's strength; the drawing is what the layers above draw from it minus what they draw
        from all zeros (the generator's biases alone). Above a top-k layer most entries of that map
        tie, so which positions survive the next top-k is arbitrary, and a layer-1 or -2 unit's
        drawing shows it.

        ``in_context``: the unit at its largest activation over ``images`` (that image, that
        position); the drawing is the image the generator draws from the layer's full activation
        minus the image it draws with that one unit set to zero: what the unit adds to a real
        image, where the other units decide the top-k selections above it as they do in training."""
        g = self.generator
        acts = g.activations(self.infer(images)[0])[layer]               # (N, C, s, s)
        peaks, where = acts.flatten(2).max(2)                           # (N, C): each channel's largest, where
        strength = peaks.mean(0)                                        # (C,)
        channels, side = acts.shape[1], acts.shape[2]
        chosen = (strength.argsort(descending=True)[:units] if units else torch.arange(channels)).to(acts.device)
        rows = torch.arange(chosen.numel(), device=acts.device)
        if in_context:
            best = peaks[:, chosen].argmax(0)                           # (U,): the image where each is largest
            position = where[best, chosen]
            h = acts[best]                                              # (U, C, s, s)
            without = h.clone()
            without[rows, chosen, position // side, position % side] = 0.0
            return g.forward_from(layer, h) - g.forward_from(layer, without)
        h = acts.new_zeros(chosen.numel(), channels, side, side)
        h[rows, chosen, side // 2, side // 2] = strength[chosen]
        background = g.forward_from(layer, acts.new_zeros(1, channels, side, side))
        return g.forward_from(layer, h) - background
