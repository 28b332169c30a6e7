"""What a model placed on the canvas: the pieces that the coloured figures draw."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Parts:
    """The pieces a model drew for a batch of B images, each on the full canvas.

    canvas  (B, 1, H, W): the image the model predicts (the likelihood's mean)
    placed  (B, T, 1, H, W): piece t of each image where the model put it, before the likelihood's
            link (for the RNP, the T top-level children; they sum to the canvas)
    present (B, T) bool or None: which pieces exist, for models that decide how many to draw
            (a sequential model's z_pres); None when every piece is always drawn
    labels  T names saying what piece t is ("part 1", "object 2", ...)
    boxes   (B, T, 4) or None: (x0, y0, x1, y1) in canvas pixels, where piece t's patch or window
            went (spatial.patch_box), for models that place pieces by an affine map
    """
    canvas: torch.Tensor
    placed: torch.Tensor
    labels: list[str]
    present: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
