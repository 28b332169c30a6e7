"""DM-VAE, the Discrete Memory addressing VAE (Min, Su, Zhu, Zhang), as its paper defines it, for this harness.

AIR's sequence of up to T objects (T = ``config.max_parts``), each drawn from a learned memory
M = (m_1 .. m_K) of K slots (``config.slots``) of size d (``config.slot_size``). Model, per image,
for steps t = 0 .. T-1, every site in the "data" plate:

    z_pres_t  ~ Concrete-Bernoulli(lambda, rho * z_pres_{t-1})   (hard Bernoulli in evaluation)
    z_type_t  ~ Concrete(lambda, uniform over K)                  the address (one-hot in evaluation)
    m_t       = z_type_t @ M                                      the slot read
    z_where_t ~ Normal([s, s, 0, 0], [s_sd, s_sd, xy_sd, xy_sd])  (scale x, scale y, x, y)
    eps_t     ~ Normal(mu(m_t), sigma(m_t))                       part noise, p(eps | slot)
    part_t    = sigmoid(g([eps_t, m_t]))                          one generator for every slot
    canvas    = sum_t z_pres_t * place(part_t, z_where_t)
    x         ~ likelihood(canvas)

z_where, z_type and eps are masked by z_pres_t in evaluation (hard z_pres); in training the
relaxed z_pres_t only scales its part, as the paper's relaxation does (no REINFORCE, no
baselines: every site is reparameterised, and the model trains with Trace_ELBO).

Guide: an LSTM cell reads the image and the previous step's latents; it gives q(z_pres) and
q(z_where); the window under z_where is cut out; q(z_type | crop) has logits
beta * cos(h_m(m_j), h_x(crop)) over the slots (beta a learned sharpness: a bare cosine in
[-1, 1] would leave q nearly flat over 15 slots); q(eps | crop, m) is a Normal from an MLP on
[crop, slot read].

The information loss, gamma * E[log q(z_type = j | x_syn_j)]: at every step of every batch, one
synthetic part x_syn_j = g(eps_j, m_j), eps_j ~ p(eps | m_j), per slot j, fed back through
the guide's address network; its mean over slots is added to each image's objective as the
factor "information" (our reading of "at each step sample a part for every slot").

What the paper leaves open is a config field with our default (config.py): slot size, window
(``patch_size``), temperature, gamma, the initial sharpness, z_pres's prior.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro import poutine

from .config import RNPConfig
from .likelihoods import make_likelihood
from .sequential import SequentialPartsModel, mlp
from .spatial import crop, place

EPS = 1e-4  # keeps relaxed probabilities and values off 0 and 1, where Concrete densities are infinite


def where_to_theta(z_where: torch.Tensor) -> torch.Tensor:
    """(N, 4) (scale x, scale y, x, y) -> (N, 2, 3) [[sx, 0, x], [0, sy, y]]: canvas to part coordinates."""
    sx, sy, x, y = z_where.unbind(-1)
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero, x], -1), torch.stack([zero, sy, y], -1)], -2)


@dataclass
class DMVAELatents:
    """Per step, for N images: z_pres (N, T), z_type (N, T, K) one-hot or relaxed, z_where (N, T, 4),
    eps (N, T, noise)."""
    z_pres: torch.Tensor
    z_type: torch.Tensor
    z_where: torch.Tensor
    eps: torch.Tensor


class DMVAE(SequentialPartsModel):
    """The model and guide above; implements the model protocol of registry.py ("trace_elbo").

    ``relaxed`` (True while training, False in eval mode) chooses the Concrete sites or the hard
    ones: evaluation and figures always read hard addresses and counts.
    """

    theta = staticmethod(where_to_theta)

    def __init__(self, config: RNPConfig):
        super().__init__()
        self.config = c = config
        self.steps, self.canvas_size, self.window_size = c.max_parts, c.image_size, c.patch_size
        self.slots, self.noise = c.slots, c.part_noise
        pixels, window, hidden = c.image_size ** 2, c.patch_size ** 2, (256, 128)
        self.memory = nn.Parameter(torch.rand(c.slots, c.slot_size) * 2 - 1)  # uniform at random (the paper)
        self.noise_prior = mlp([c.slot_size, *hidden, 2 * c.part_noise])
        self.generator = mlp([c.part_noise + c.slot_size, *hidden, window])
        self.rnn = nn.LSTMCell(pixels + 4 + c.slots + c.part_noise + 1, c.air_lstm)
        self.predict = mlp([c.air_lstm, *hidden, 9])
        self.crop_embedding = mlp([window, *hidden])
        self.slot_embedding = mlp([c.slot_size, *hidden])
        self.log_sharpness = nn.Parameter(torch.tensor(float(c.dmvae_sharpness)).log())
        self.noise_encoder = mlp([window + c.slot_size, *hidden, 2 * c.part_noise])
        self.likelihood = make_likelihood(c.likelihood, c.likelihood_scale, c.image_size)
        self.register_buffer("where_loc", torch.tensor([c.air_scale_mean, c.air_scale_mean, 0.0, 0.0]))
        self.register_buffer("where_scale", torch.tensor([c.air_scale_sd, c.air_scale_sd, c.air_position_sd,
                                                          c.air_position_sd]))

    @property
    def relaxed(self) -> bool:
        return self.training

    # --- pieces shared by model, guide and figures -------------------------------------------
    def part(self, eps: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """g(eps, m): (N, noise), (N, d) -> (N, 1, W, W) in (0, 1)."""
        out = torch.sigmoid(self.generator(torch.cat([eps, slot], -1)))
        return out.view(-1, 1, self.window_size, self.window_size)

    def noise_given(self, slot: torch.Tensor) -> dist.Normal:
        """p(eps | m): a Normal (N, noise) from the slot read."""
        out = self.noise_prior(slot)
        return dist.Normal(out[:, :self.noise], F.softplus(out[:, self.noise:]) + 1e-4)

    def address_logits(self, window: torch.Tensor) -> torch.Tensor:
        """(N, W*W) crops -> (N, K) logits of q(z_type | crop): beta * cos(h_m(m_j), h_x(crop))."""
        crops = F.normalize(self.crop_embedding(window), dim=-1)
        slots = F.normalize(self.slot_embedding(self.memory), dim=-1)
        return self.log_sharpness.exp() * crops @ slots.t()

    def _presence(self, probs: torch.Tensor) -> dist.Distribution:
        if self.relaxed:
            return dist.RelaxedBernoulli(probs.new_tensor(self.config.dmvae_temperature),
                                         probs=probs.clamp(EPS, 1 - EPS))
        return dist.Bernoulli(probs)

    def _address(self, logits: torch.Tensor) -> dist.Distribution:
        if self.relaxed:
            return dist.RelaxedOneHotCategorical(logits.new_tensor(self.config.dmvae_temperature), logits=logits)
        return dist.OneHotCategorical(logits=logits)

    def draw(self, latents: DMVAELatents) -> tuple[torch.Tensor, torch.Tensor]:
        """(canvas (N, 1, C, C), placed (N, T, 1, C, C)) of the given latents."""
        placed = []
        for t in range(latents.z_pres.shape[1]):
            part = self.part(latents.eps[:, t], latents.z_type[:, t] @ self.memory)
            on_canvas = place(part, where_to_theta(latents.z_where[:, t]), self.canvas_size)
            placed.append(latents.z_pres[:, t, None, None, None] * on_canvas)
        placed = torch.stack(placed, 1)
        return placed.sum(1), placed

    # --- Pyro model and guide ---------------------------------------------------------------
    def model(self, x: torch.Tensor | None = None, batch_size: int | None = None, part_term: bool = True):
        """The generative model above; ``part_term=False`` leaves out the information loss (evaluation)."""
        pyro.module("dmvae", self)
        n = x.shape[0] if x is not None else batch_size
        uniform = self.memory.new_zeros(n, self.slots)
        with pyro.plate("data", n):
            canvas = self.memory.new_zeros(n, 1, self.canvas_size, self.canvas_size)
            z_pres = self.memory.new_ones(n)
            for t in range(self.steps):
                z_pres = pyro.sample(f"z_pres_{t}", self._presence(self.config.z_pres_prior * z_pres))
                mask = True if self.relaxed else z_pres.bool()
                with poutine.mask(mask=mask):
                    z_type = pyro.sample(f"z_type_{t}", self._address(uniform))
                    z_where = pyro.sample(f"z_where_{t}", dist.Normal(self.where_loc, self.where_scale)
                                          .expand([n, 4]).to_event(1))
                    slot = z_type @ self.memory
                    eps = pyro.sample(f"eps_{t}", self.noise_given(slot).to_event(1))
                part = self.part(eps, slot)
                canvas = canvas + z_pres[:, None, None, None] * place(part, where_to_theta(z_where), self.canvas_size)
            if part_term and self.config.dmvae_gamma > 0:
                pyro.factor("information", self.config.dmvae_gamma * self.information().expand(n))
            return pyro.sample("x", self.likelihood.distribution(canvas),
                               obs=None if x is None else self.likelihood.observation(x))

    def information(self) -> torch.Tensor:
        """Mean over slots j of log q(z_type = j | x_syn_j), one synthetic part per slot (a 0-dim tensor)."""
        eps = self.noise_given(self.memory).rsample()
        synthetic = self.part(eps, self.memory).flatten(1)
        log_q = torch.log_softmax(self.address_logits(synthetic), -1)
        return log_q.diagonal().mean()

    def guide(self, x: torch.Tensor):
        pyro.module("dmvae", self)
        return self._infer(x, pyro.sample)

    def _infer(self, x: torch.Tensor, sample) -> DMVAELatents:
        """Run the guide's recurrence, drawing every site with ``sample(name, distribution)``."""
        n = x.shape[0]
        image = x.reshape(n, -1)
        state = None
        z_where, z_type = x.new_zeros(n, 4), x.new_zeros(n, self.slots)
        eps, z_pres = x.new_zeros(n, self.noise), x.new_ones(n)
        steps = []
        with pyro.plate("data", n):
            for t in range(self.steps):
                state = self.rnn(torch.cat([image, z_where, z_type, eps, z_pres[:, None]], -1), state)
                out = self.predict(state[0])
                z_pres = sample(f"z_pres_{t}", self._presence(torch.sigmoid(out[:, 0]) * z_pres))
                mask = True if self.relaxed else z_pres.bool()
                with poutine.mask(mask=mask):
                    z_where = sample(f"z_where_{t}", dist.Normal(self.where_loc + out[:, 1:5],
                                                                 F.softplus(out[:, 5:9]) + 1e-4).to_event(1))
                    window = crop(x, where_to_theta(z_where), self.window_size).flatten(1)
                    z_type = sample(f"z_type_{t}", self._address(self.address_logits(window)))
                    slot = z_type @ self.memory
                    noise = self.noise_encoder(torch.cat([window, slot], -1))
                    eps = sample(f"eps_{t}", dist.Normal(noise[:, :self.noise],
                                                         F.softplus(noise[:, self.noise:]) + 1e-4).to_event(1))
                steps.append((z_pres, z_type, z_where, eps))
        pres, types, where, noise = (torch.stack(v, 1) for v in zip(*steps))
        return DMVAELatents(pres, types, where, noise)

    # --- what the commands read (hard sites: the model in eval mode) ----------------------------
    def address(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T) the slot each step reads (its mode), -1 where the step draws nothing."""
        latents = self.infer_modes(x)
        return torch.where(latents.z_pres.bool(), latents.z_type.argmax(-1), -1)

    @torch.no_grad()
    def sample_latents(self, n: int) -> DMVAELatents:
        """n draws of every latent from the prior, with hard presences and addresses."""
        device = self.memory.device
        z_pres = self.prior_presence(n, device)
        z_type = F.one_hot(torch.randint(self.slots, (n, self.steps), device=device), self.slots).float()
        z_where = self.where_loc + self.where_scale * torch.randn(n, self.steps, 4, device=device)
        eps = self.noise_given((z_type @ self.memory).flatten(0, 1)).sample().view(n, self.steps, -1)
        return DMVAELatents(z_pres, z_type, z_where, eps)

    @torch.no_grad()
    def slot_drawings(self, samples: int = 1) -> torch.Tensor:
        """(K, samples, 1, W, W): what each memory slot draws, for noise drawn from p(eps | slot)."""
        slots = self.memory.repeat_interleave(samples, 0)
        return self.part(self.noise_given(slots).sample(), slots).view(self.slots, samples, 1, self.window_size,
                                                                        self.window_size)
