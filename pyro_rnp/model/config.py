"""One dataclass holds everything needed to rebuild a model and continue its training.

Presets: the paper's settings per dataset (``RNPConfig.preset("fashion")``) and a
CPU-friendly schedule (``RNPConfig.preset("fashion", "quick")``) with the same
architecture. Override single fields with ``dataclasses.replace``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..data.catalog import DATASETS, IMAGE_SIZE

SCHEDULES = ("paper", "quick", "long")
LIKELIHOODS = ("normal", "normal-learned", "normal-pixel", "laplace", "continuous-bernoulli", "bernoulli")
ACTIVATIONS = ("elu", "linear")
LR_SCHEDULES = ("constant", "cosine")
SPARSITIES = ("top-k", "none")
ANDOR_OUTPUTS = ("linear", "sigmoid")
BINARIZATIONS = ("none", "dynamic")


@dataclass(frozen=True)
class RNPConfig:
    # data
    dataset: str = "fashion"
    limit: int | None = None          # use the first N training images
    exclude_classes: tuple[int, ...] = ()
    # model (RNP-MODEL.md; defaults are the paper's sizes)
    model: str = "rnp"                # the registered model (registry.py): rnp, vae, or a plugin's
    z_dim: int = 32                   # |z|, the program vector
    depth: int = 2                    # levels K of the program tree
    steps: int = 4                    # tau, children per program
    hidden: int = 64                  # width of H's trunk and of the generated hidden layers
    embed: int = 32                   # size of the patch encoding read by the two RNNs
    action_hidden: int = 32           # width of the generated action decoder
    image_size: int | None = None     # side of the images and of the top-level canvas (None: the dataset's)
    patch_size: int = 28              # side of leaf patches and child canvases (RNP), and of AIR's window
    scale_offset: float = 3.3         # s0 added to the diagonal of every affine action
    generated_activation: str = "elu" # between generated layers: "elu" (paper) or "linear" (authors' code)
    encoder_blocks: int = 5
    encoder_hidden: int = 64
    likelihood: str = "normal"        # one of LIKELIHOODS (likelihoods.py); "normal": sigma = likelihood_scale
    likelihood_scale: float = 0.5     #   (0.5 is the paper's loss); the learned scales start at it
    binarize: str = "none"            # "dynamic": each epoch a fresh Bernoulli draw of every training pixel from its
                                      #   grey level, the held-out images one fixed draw (the standard MNIST
                                      #   benchmark; needs likelihood "bernoulli")
    part_weight: float = 1.0          # weight of the part-level regulariser (a pyro.factor)
    # AIR (air.py): up to max_parts objects, each a window placed on the canvas
    max_parts: int = 3                # steps T
    z_what_dim: int = 50              # each object's appearance code
    z_pres_prior: float = 0.01        # rho: P(z_pres_t = 1 | z_pres_{t-1} = 1) (the AIR tutorial's)
    air_scale_mean: float | None = None  # z_where prior: scale ~ N(air_scale_mean, air_scale_sd); None: 3 on
                                      #   50x50 scenes (the tutorial's: a window 1/3 of the scene), 1.4 on 28x28
                                      #   images (our choice: a window as wide as MNIST's 20-pixel digit box),
    air_scale_sd: float = 0.2         #   x, y ~ N(0, air_position_sd) (sd 0.2: the tutorial's; the example's is 0.1)
    air_position_sd: float = 1.0
    air_lstm: int = 256               # the guide's LSTM cell (and the baseline's)
    air_hidden: int = 200             # decoder, predict net, window encoder and baseline head widths
    air_decoder_bias: float = -2.0    # added to the decoder's output before its sigmoid (the tutorial's)
    baseline_lr: float = 0.1          # Adam learning rate of the z_pres baselines (the tutorial's)
    # DM-VAE (dmvae.py): AIR's sequence, each part drawn from a learned memory of slots (window: patch_size;
    # max_parts, z_pres_prior and the z_where prior as AIR's, with a scale per axis)
    slots: int = 15                   # K, the paper's for Multi-MNIST
    slot_size: int = 64               # d (not stated in the paper: our choice)
    part_noise: int = 32              # eps, the paper's
    dmvae_temperature: float = 0.5    # the Concrete relaxations' temperature (not stated: our choice)
    dmvae_gamma: float = 1.0          # weight of the information loss (not stated: our choice)
    dmvae_sharpness: float = 10.0     # initial beta of q(z_type | crop) = softmax(beta * cosine) (learned; our choice)
    # sparse AND-OR generator (sparse_andor.py): Z ~ N(0, I_z_dim), a top-k sparse convolutional generator,
    # alternating back-propagation (not stated in the paper, all ours: the first author's related code uses
    # 20 Langevin steps of size 0.1)
    sparsity: str = "top-k"           # "top-k" (the paper's) or "none" (its ablation: the same network, dense)
    andor_width: int = 16             # w: channels 4w, 4w, 2w, w (the paper's 512, 256, 128, 64 at 64x64)
    andor_output: str = "linear"      # g's last layer: "linear" (ours) or "sigmoid" (the paper's tanh for [0, 1]
                                      #   pixels; it saturated the dense ablation at black within 20 steps: guide)
    andor_k_fc: int = 8               # top-k channels at each position of the fully connected layer (the paper's)
    andor_k_fraction: float = 0.25    # top-k positions per channel of the sparse conv blocks (the paper's 16/64)
    langevin_steps: int = 20          # Langevin steps per training image and step
    langevin_step_size: float = 0.1   # delta
    langevin_max_drift: float | None = 2.0   # longest drift (delta^2 / 2) grad of one latent per step (ours: the quick
                                      #   runs' healthy drifts stayed under 2.1; None: unbounded, the paper's)
    infer_steps: int = 100            # held-out inference: Adam steps on -log p(z, x) from a prior draw, then
    infer_lr: float = 0.3             #   at this rate (ours: on 64 MNIST test images, 60 steps reached log p(z, x)
                                      #   -126 per image where noise-free Langevin at delta 0.1 reached -247)
    proposal_samples: int = 20        # Langevin steps from there that set the held-out proposal's scale
    andor_critic: bool = False        # the paper's energy-based critic (ours: off; guides/sparse-andor.md says why)
    critic_weight: float = 1.0        # the critic's energy of generated images in g's loss, per image (ours)
    critic_regulariser: float = 0.1   # weight of the critic's squared energies, which keeps them bounded (ours)
    # components (components.py): what p(z), q(z | x) and the decoder are
    prior: str = "normal"             # normal (paper), mog, vamp, flow
    prior_components: int = 16        # K for mog and vamp
    flow_layers: int = 2              # transforms in the flow prior and in the IAF guide
    guide: str = "resnet"             # resnet (paper), resnet-lowrank, resnet-iaf, autonormal
    guide_rank: int = 4               # rank of the low-rank guide's covariance factor
    decoder: str = "rnp"              # rnp (the program executor) or mlp (what model "vae" decodes with)
    decoder_hidden: int = 512         # width of the mlp decoder
    plugins: tuple[str, ...] = ()     # user modules that register components, imported before building
    # training
    schedule: str = "paper"           # the preset the training settings came from: "paper" or "quick"
    epochs: int = 200
    batch_size: int = 64
    lr: float = 4e-5
    head_lr_scale: float = 1.0        # the hypernetwork head's learning rate relative to lr (paper: 1)
    lr_warmup_steps: int = 0          # linear warm-up from 0 over this many steps
    lr_schedule: str = "constant"     # after warm-up: "constant" (paper) or "cosine" (decay to 0 at the last step)
    grad_clip: float = 0.2            # clamp every gradient element to +-grad_clip (authors' code); 0 disables
    seed: int = 0
    eval_limit: int | None = None     # held-out images evaluated after each epoch (None: all)
    figure_every: int = 5             # refresh figures every N epochs (and at the end)
    curriculum_epochs: int = 0        # train one depth at a time: depth 1 for this many epochs, then depth 2 for as
                                      #   many, ..., the full depth after; one hypernetwork, so every stage starts
                                      #   from the last one's weights, optimizer and lr schedule (our choice of
                                      #   schedule: the paper only remarks that it can be done); 0: off
    # speed options that change numerics (recorded; may change on --resume)
    amp: str | None = None            # "bf16": forward pass under autocast in bfloat16 (CUDA, or a bf16 CPU)
    compile: bool = False             # torch.compile the encoder (and an mlp decoder)

    def __post_init__(self):
        checks = [
            (self.dataset in DATASETS, f"dataset must be one of {', '.join(DATASETS)}, not {self.dataset!r}"),
            (isinstance(self.model, str) and bool(self.model), "model must be a registered model's name"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}"),
            (self.amp in (None, "bf16"), f"amp must be None or 'bf16', not {self.amp!r}"),
            (self.lr_schedule in LR_SCHEDULES,
             f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not {self.lr_schedule!r}"),
            (self.likelihood in LIKELIHOODS, f"likelihood must be one of {', '.join(LIKELIHOODS)}, not {self.likelihood!r}"),
            (self.binarize in BINARIZATIONS, f"binarize must be one of {', '.join(BINARIZATIONS)}, not {self.binarize!r}"),
            (self.binarize == "none" or self.likelihood == "bernoulli",
             f"binarize {self.binarize!r} draws binary images: it needs likelihood 'bernoulli', not {self.likelihood!r}"),
            (self.generated_activation in ACTIVATIONS,
             f"generated_activation must be one of {', '.join(ACTIVATIONS)}, not {self.generated_activation!r}"),
            (self.depth >= 1, "depth must be at least 1"),
            (self.steps >= 1, "steps must be at least 1"),
            (min(self.z_dim, self.hidden, self.embed, self.action_hidden, self.encoder_hidden) >= 1,
             "layer sizes must be positive"),
            (self.encoder_blocks >= 0, "encoder_blocks must be >= 0"),
            (self.image_size is None or self.image_size == IMAGE_SIZE.get(self.dataset),
             f"image_size of {self.dataset} is {IMAGE_SIZE.get(self.dataset)}, not {self.image_size}"),
            (self.patch_size == 28, "patch_size must be 28 (the hypernetwork's patches; AIR's window)"),
            (min(self.max_parts, self.z_what_dim, self.air_lstm, self.air_hidden) >= 1,
             "max_parts, z_what_dim, air_lstm and air_hidden must be positive"),
            (0 < self.z_pres_prior < 1, "z_pres_prior must be in (0, 1)"),
            (min(self.slots, self.slot_size, self.part_noise) >= 1, "slots, slot_size and part_noise must be positive"),
            (self.dmvae_temperature > 0 and self.dmvae_sharpness > 0 and self.dmvae_gamma >= 0,
             "dmvae_temperature and dmvae_sharpness must be positive, dmvae_gamma >= 0"),
            (min(self.air_scale_sd, self.air_position_sd, self.baseline_lr) > 0,
             "air_scale_sd, air_position_sd and baseline_lr must be positive"),
            (self.sparsity in SPARSITIES, f"sparsity must be one of {', '.join(SPARSITIES)}, not {self.sparsity!r}"),
            (self.andor_output in ANDOR_OUTPUTS,
             f"andor_output must be one of {', '.join(ANDOR_OUTPUTS)}, not {self.andor_output!r}"),
            (min(self.andor_width, self.andor_k_fc, self.langevin_steps, self.infer_steps) >= 1
             and self.proposal_samples >= 2 and min(self.langevin_step_size, self.infer_lr) > 0
             and (self.langevin_max_drift is None or self.langevin_max_drift > 0)
             and 0 < self.andor_k_fraction <= 1,
             "andor_width, andor_k_fc, langevin_steps and infer_steps must be positive, proposal_samples at least "
             "2, langevin_step_size, infer_lr and langevin_max_drift (unless None) positive, andor_k_fraction in (0, 1]"),
            (self.critic_weight >= 0 and self.critic_regulariser >= 0,
             "critic_weight and critic_regulariser must be >= 0"),
            (self.epochs >= 0, "epochs must be >= 0"),
            (self.curriculum_epochs >= 0, "curriculum_epochs must be >= 0"),
            (self.curriculum_epochs == 0 or (self.model == "rnp" and self.decoder == "rnp" and self.depth >= 2),
             "a curriculum trains the program tree one depth at a time: it needs the rnp model at depth 2 or more"),
            (self.curriculum_epochs == 0 or (self.depth - 1) * self.curriculum_epochs < self.epochs,
             f"a curriculum of {self.curriculum_epochs} epochs per depth below {self.depth} leaves no epoch at the "
             f"full depth in {self.epochs}: train more epochs or a shorter curriculum"),
            (self.batch_size >= 2, "batch_size must be at least 2 (the encoder uses batch norm)"),
            (self.lr > 0, "lr must be positive"),
            (self.head_lr_scale > 0, "head_lr_scale must be positive"),
            (self.likelihood_scale > 0, "likelihood_scale must be positive"),
            (self.limit is None or self.limit >= 2, "limit must be at least 2"),
            (min(self.prior_components, self.flow_layers, self.guide_rank, self.decoder_hidden) >= 1,
             "prior_components, flow_layers, guide_rank and decoder_hidden must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        # the mlp decoder is the vae model, and the vae model decodes with it (configs written before
        # models had names said decoder "mlp" alone)
        if self.decoder == "mlp" and self.model == "rnp":
            object.__setattr__(self, "model", "vae")
        if self.model == "vae":
            object.__setattr__(self, "decoder", "mlp")
        if self.image_size is None:
            object.__setattr__(self, "image_size", IMAGE_SIZE[self.dataset])
        if self.air_scale_mean is None:
            object.__setattr__(self, "air_scale_mean", 3.0 if self.image_size >= 50 else 1.4)
        object.__setattr__(self, "exclude_classes", tuple(int(c) for c in self.exclude_classes))
        object.__setattr__(self, "plugins", tuple(str(p) for p in self.plugins))

    def depth_in_epoch(self, epoch: int) -> int:
        """The depth trained in epoch ``epoch`` (counted from 0): the full depth unless a curriculum
        trains a shallower tree first."""
        if self.curriculum_epochs == 0:
            return self.depth
        return min(self.depth, 1 + epoch // self.curriculum_epochs)

    @classmethod
    def preset(cls, dataset: str, schedule: str = "paper", **overrides) -> "RNPConfig":
        """The paper's settings for ``dataset``; ``schedule="quick"`` trains in minutes on a CPU."""
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown preset {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        omniglot = dataset == "omniglot"
        values = dict(dataset=dataset, schedule=schedule, z_dim=96 if omniglot else 32,
                      epochs=400 if omniglot else 200)
        if dataset == "multi-mnist":
            values.update(MULTI_MNIST)
        if schedule == "long" and overrides.get("model", "rnp") not in LONG_MODELS:
            raise ValueError(f"the long preset is the RNP's and the VAE's schedule; train {overrides['model']} "
                             "with --preset quick and more --epochs")
        if schedule in ("quick", "long"):
            values.update(QUICK if schedule == "quick" else LONG)
            if dataset == "multi-mnist" and overrides.get("model", "rnp") == "rnp":
                values.update(MULTI_MNIST_RNP_QUICK)
        values.update(MODEL_SCHEDULES.get((overrides.get("model"), schedule), {}))
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exclude_classes"] = list(self.exclude_classes)
        d["plugins"] = list(self.plugins)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RNPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        if d.get("model") == "sparse-andor":        # run folders written before these fields: what they ran
            d = {"andor_output": "sigmoid", "langevin_max_drift": None, **d}
        return cls(**d)

    # fields that define the model's parameters: a checkpoint fits only a config that agrees on these
    ARCHITECTURE = ("model", "z_dim", "depth", "steps", "hidden", "embed", "action_hidden", "image_size", "patch_size",
                    "max_parts", "z_what_dim", "air_lstm", "air_hidden", "slots", "slot_size", "part_noise",
                    "generated_activation", "sparsity", "andor_width", "andor_output", "andor_critic", "encoder_blocks",
                    "encoder_hidden", "prior", "prior_components", "flow_layers", "guide", "guide_rank", "decoder",
                    "decoder_hidden")


# The quick schedule: same architecture, 2 epochs. The hypernetwork head learns at a fifth of the rate
# of the rest (2e-4 at its peak, the rest 1e-3); warm-up, then cosine decay. Measured in the README.
QUICK = dict(epochs=2, lr=1e-3, head_lr_scale=0.2, lr_warmup_steps=200, lr_schedule="cosine",
             eval_limit=2000, figure_every=1)

# The long schedule (ours): the quick schedule's rates, warm-up and head rate, its cosine decay stretched over ten
# times the epochs, for the reference runs that show what the quick runs leave undecided. The RNP and the VAE only.
LONG = dict(QUICK, epochs=20, figure_every=2)
LONG_MODELS = ("rnp", "vae")

# Multi-MNIST, every model: Normal(sigma=0.3) per pixel, the likelihood of Pyro's AIR example (our choice, so
# that AIR trains as its users know it and every model is scored under the same one).
MULTI_MNIST = dict(likelihood="normal", likelihood_scale=0.3)
# The RNP's quick schedule there: under sigma 0.3 the loss is 2.8 times sharper than under the paper's 0.5,
# and at lr 1e-3 the head diverged at step 190; at 3e-4 both epochs trained (runs/multi-mnist-rnp-quick).
MULTI_MNIST_RNP_QUICK = dict(lr=3e-4)

# AIR's training (Pyro's example and tutorial): Adam 1e-4, batch 64, no gradient clamp; paper: the tutorial's
# 200,000 steps (213 epochs of 60,000 scenes). DM-VAE's paper: the same optimiser, 300 epochs. quick: about
# 20 minutes on this project's 2-core CPU (AIR measured 113 ms a step at batch 64, DM-VAE 60 ms); the
# tutorial's AIR counts about 95% of training scenes right by 10,000 steps.
_SEQUENTIAL = dict(lr=1e-4, batch_size=64, grad_clip=0.0, head_lr_scale=1.0, lr_warmup_steps=0,
                   lr_schedule="constant")
# The sparse AND-OR generator: the paper's Z of 100; Adam 1e-3, batch 64 (not stated in the paper: ours; on
# 1,024 MNIST images 1e-3 reached a held-out MSE of 0.177 after one epoch where 3e-4 reached 0.216).
# paper: the whole training set, 50 epochs (ours). quick: the first 10,000 training images (as the paper
# trains on CelebA's first 10k) for 5 epochs, 10 Langevin steps a visit, so that each persistent latent sees
# 50; held-out inference 60 steps and a proposal scale from 10 more, on 256 images after each epoch.
_ANDOR = dict(z_dim=100, lr=1e-3, batch_size=64, grad_clip=0.0, head_lr_scale=1.0, lr_warmup_steps=0,
              lr_schedule="constant")
# (model, preset) -> the training settings of models whose papers train them their own way
MODEL_SCHEDULES = {
    ("sparse-andor", "paper"): dict(_ANDOR, epochs=50),
    ("sparse-andor", "quick"): dict(_ANDOR, epochs=5, limit=10_000, langevin_steps=10, infer_steps=60,
                                    proposal_samples=10, eval_limit=256, figure_every=1),
    ("air", "paper"): dict(_SEQUENTIAL, epochs=213),
    ("dmvae", "paper"): dict(_SEQUENTIAL, epochs=300),
    ("air", "quick"): dict(_SEQUENTIAL, epochs=10, eval_limit=2000, figure_every=2),    # ~9,400 steps
    ("dmvae", "quick"): dict(_SEQUENTIAL, epochs=15, eval_limit=2000, figure_every=3),  # ~14,000 steps
}
