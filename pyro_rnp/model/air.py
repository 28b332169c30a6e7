"""AIR, Attend-Infer-Repeat (Eslami et al. 2016), as Pyro's AIR example defines it, for this harness.

Model, per image, for steps t = 0 .. T-1 (T = ``config.max_parts``), every site in the "data" plate:

    z_pres_t  ~ Bernoulli(rho * z_pres_{t-1})             (z_pres_{-1} = 1: once 0, always 0)
    z_where_t ~ Normal([s_mu, 0, 0], [s_sd, xy_sd, xy_sd]) (scale, x, y), masked by z_pres_t
    z_what_t  ~ Normal(0, I)                               masked by z_pres_t
    window_t  = sigmoid(decoder(z_what_t) + b)             a W x W window (W = ``config.patch_size``)
    canvas    = sum_t z_pres_t * place(window_t, z_where_t) on the C x C scene (C = ``config.image_size``)
    x         ~ likelihood(canvas)

with theta = [[s, 0, x], [0, s, y]] mapping canvas to window coordinates (as affine_grid), so
the window appears 1/s of the canvas wide at (x, y).

Guide: an LSTM cell reads the whole image and the previous step's (z_where, z_what, z_pres);
a predict net gives z_pres's probability and z_where's location (an offset from the prior's)
and scale; the window is cut out with the inverse map and an encoder gives z_what's location
and scale. z_pres is discrete, so the model trains with TraceGraph_ELBO, and each z_pres site
carries a learned baseline (``infer={"baseline": {"baseline_value": b_t}}``): a second LSTM cell
on the detached inputs, then an MLP, with its own learning rate (``optimizer_groups``).
The batch is never subsampled from a larger set (the plate has no scale), so the baseline's
targets are one image's downstream cost.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import RNPConfig
from .likelihoods import make_likelihood, register as register_likelihood
from .sequential import SequentialPartsModel, mlp
from .spatial import crop, place


GUIDE_NETWORKS = ("rnn", "predict", "encode", "baseline_rnn", "baseline_head")
BASELINE_NETWORKS = ("baseline_rnn", "baseline_head")


def where_to_theta(z_where: torch.Tensor) -> torch.Tensor:
    """(N, 3) (s, x, y) -> (N, 2, 3) [[s, 0, x], [0, s, y]]: canvas to window coordinates."""
    s, x, y = z_where.unbind(-1)
    zero = torch.zeros_like(s)
    return torch.stack([torch.stack([s, zero, x], -1), torch.stack([zero, s, y], -1)], -2)


@dataclass
class AIRLatents:
    """One value per step of each latent, for a batch of N images: z_pres (N, T) in {0, 1},
    z_where (N, T, 3), z_what (N, T, z_what_dim)."""
    z_pres: torch.Tensor
    z_where: torch.Tensor
    z_what: torch.Tensor


class AIR(SequentialPartsModel):
    """The model and guide above; implements the model protocol of registry.py ("tracegraph_elbo")."""

    objective = "tracegraph_elbo"
    theta = staticmethod(where_to_theta)

    def __init__(self, config: RNPConfig):
        super().__init__()
        self.config = c = config
        self.steps, self.canvas_size, self.window_size, self.z_what_dim = (
            c.max_parts, c.image_size, c.patch_size, c.z_what_dim)
        pixels, window = c.image_size ** 2, c.patch_size ** 2
        state = c.air_lstm
        self.decoder = mlp([c.z_what_dim, c.air_hidden, window])
        self.decoder_bias = c.air_decoder_bias
        lstm_input = pixels + 3 + c.z_what_dim + 1
        self.rnn = nn.LSTMCell(lstm_input, state)
        self.predict = mlp([state, c.air_hidden, 7])
        self.encode = mlp([window, c.air_hidden, 2 * c.z_what_dim])
        self.baseline_rnn = nn.LSTMCell(lstm_input, state)
        self.baseline_head = mlp([state, c.air_hidden, 1])
        self.likelihood = make_likelihood(c.likelihood, c.likelihood_scale, c.image_size)
        self.register_buffer("where_loc", torch.tensor([c.air_scale_mean, 0.0, 0.0]))
        self.register_buffer("where_scale", torch.tensor([c.air_scale_sd, c.air_position_sd, c.air_position_sd]))

    # --- what the model draws ---------------------------------------------------------------
    def window(self, z_what: torch.Tensor) -> torch.Tensor:
        """(N, z_what_dim) -> (N, 1, W, W) windows in (0, 1)."""
        out = torch.sigmoid(self.decoder(z_what) + self.decoder_bias)
        return out.view(-1, 1, self.window_size, self.window_size)

    def placed(self, z_where: torch.Tensor, z_what: torch.Tensor) -> torch.Tensor:
        """(N, 3), (N, z_what_dim) -> (N, 1, C, C): the window drawn on an empty canvas."""
        return place(self.window(z_what), where_to_theta(z_where), self.canvas_size)

    def draw(self, latents: AIRLatents) -> tuple[torch.Tensor, torch.Tensor]:
        """(canvas (N, 1, C, C), placed (N, T, 1, C, C)) of the given latents."""
        placed = torch.stack([latents.z_pres[:, t, None, None, None] * self.placed(latents.z_where[:, t],
                                                                                    latents.z_what[:, t])
                              for t in range(latents.z_pres.shape[1])], 1)
        return placed.sum(1), placed

    # --- Pyro model and guide ---------------------------------------------------------------
    def model(self, x: torch.Tensor | None = None, batch_size: int | None = None, part_term: bool = True):
        """The generative model above (``part_term`` is the protocol's; AIR has no part-level term)."""
        pyro.module("air_decoder", self.decoder)
        register_likelihood(self.likelihood)
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            canvas = self.where_loc.new_zeros(n, 1, self.canvas_size, self.canvas_size)
            z_pres = self.where_loc.new_ones(n, 1)
            for t in range(self.steps):
                z_pres = pyro.sample(f"z_pres_{t}", dist.Bernoulli(self.config.z_pres_prior * z_pres).to_event(1))
                mask = z_pres.squeeze(-1).bool()
                z_where = pyro.sample(f"z_where_{t}", dist.Normal(self.where_loc, self.where_scale)
                                      .expand([n, 3]).to_event(1).mask(mask))
                z_what = pyro.sample(f"z_what_{t}", dist.Normal(canvas.new_zeros(()), 1.0)
                                     .expand([n, self.z_what_dim]).to_event(1).mask(mask))
                canvas = canvas + z_pres[:, :, None, None] * self.placed(z_where, z_what)
            return pyro.sample("x", self.likelihood.distribution(canvas),
                               obs=None if x is None else self.likelihood.observation(x))

    def guide(self, x: torch.Tensor):
        for name in GUIDE_NETWORKS:
            pyro.module(f"air_{name}", getattr(self, name))
        return self._infer(x, pyro.sample)

    def _infer(self, x: torch.Tensor, sample) -> AIRLatents:
        """Run the guide's recurrence, drawing every site with ``sample(name, distribution, infer=...)``."""
        n = x.shape[0]
        image = x.reshape(n, -1)
        state = baseline_state = None
        z_where, z_what, z_pres = (x.new_zeros(n, 3), x.new_zeros(n, self.z_what_dim), x.new_ones(n, 1))
        steps = []
        with pyro.plate("data", n):
            for t in range(self.steps):
                inputs = torch.cat([image, z_where, z_what, z_pres], -1)
                state = self.rnn(inputs, state)
                out = self.predict(state[0])
                p_pres = torch.sigmoid(out[:, :1])
                where_loc = self.where_loc + out[:, 1:4]
                where_scale = F.softplus(out[:, 4:7]) + 1e-4
                baseline_state = self.baseline_rnn(inputs.detach(), baseline_state)
                baseline = self.baseline_head(baseline_state[0]).squeeze(-1)
                z_pres = sample(f"z_pres_{t}", dist.Bernoulli(p_pres * z_pres).to_event(1),
                                infer={"baseline": {"baseline_value": baseline}})
                mask = z_pres.squeeze(-1).bool()
                z_where = sample(f"z_where_{t}", dist.Normal(where_loc, where_scale).to_event(1).mask(mask))
                window = crop(x, where_to_theta(z_where), self.window_size).reshape(n, -1)
                what = self.encode(window)
                what_loc, what_scale = what[:, :self.z_what_dim], F.softplus(what[:, self.z_what_dim:]) + 1e-4
                z_what = sample(f"z_what_{t}", dist.Normal(what_loc, what_scale).to_event(1).mask(mask))
                steps.append((z_pres, z_where, z_what))
        pres, where, what = (torch.stack(v, 1) for v in zip(*steps))
        return AIRLatents(pres.squeeze(-1), where, what)

    def optimizer_groups(self, lr: float) -> list[dict]:
        """Adam's parameter groups: the baseline networks learn at ``config.baseline_lr``, the rest at lr."""
        baseline = [p for name in BASELINE_NETWORKS for p in getattr(self, name).parameters()]
        rest = [p for p in self.parameters() if all(p is not b for b in baseline)]
        return [{"params": rest, "lr": lr, "base_lr": lr},
                {"params": baseline, "lr": self.config.baseline_lr, "base_lr": self.config.baseline_lr}]

    @torch.no_grad()
    def sample_latents(self, n: int) -> AIRLatents:
        """n draws of every latent from the prior."""
        device = self.where_loc.device
        z_where = self.where_loc + self.where_scale * torch.randn(n, self.steps, 3, device=device)
        return AIRLatents(self.prior_presence(n, device), z_where, torch.randn(n, self.steps, self.z_what_dim,
                                                                                device=device))
