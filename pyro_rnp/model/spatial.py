"""Affine placement of patches on a canvas, and its inverse ("zoom in").

An action is 6 numbers in [-1, 1] read as a 2x3 matrix theta = reshape(a) + s0*[I | 0].
theta maps canvas coordinates to patch coordinates on the [-1, 1] grid, as
``affine_grid`` does, so a scale s0 >= 2.3 shrinks the patch by that factor:
every child is smaller than its parent by construction.

Placement is computed in at least float32 whatever the networks compute in: under
bfloat16 autocast, 3.3 would become 3.297 and the sampling grid would lose pixels.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .precision import full_precision


def action_to_theta(action: torch.Tensor, scale_offset: float) -> torch.Tensor:
    """(..., 6) actions -> (..., 2, 3) affine matrices with s0 added to the diagonal, in at least float32."""
    theta = full_precision(action).reshape(*action.shape[:-1], 2, 3)
    return theta + _scale_offset(scale_offset, theta.dtype, theta.device)


@functools.lru_cache(maxsize=16)
def _scale_offset(scale_offset: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[[s0, 0, 0], [0, s0, 0]], made once per device: building it per call copies it from the host,
    which makes a CUDA step wait."""
    with torch.inference_mode(False):  # cached: it must also serve steps that record gradients
        return torch.tensor([[scale_offset, 0.0, 0.0], [0.0, scale_offset, 0.0]], dtype=dtype, device=device)


def invert_theta(theta: torch.Tensor) -> torch.Tensor:
    """The true inverse [A^-1 | -A^-1 t] of (..., 2, 3) affine maps (closed-form 2x2 inverse).

    The authors' code inverts only the diagonal, which is wrong under rotation or shear.
    """
    a, b, tx = theta[..., 0, 0], theta[..., 0, 1], theta[..., 0, 2]
    c, d, ty = theta[..., 1, 0], theta[..., 1, 1], theta[..., 1, 2]
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    row0 = torch.stack([ia, ib, -(ia * tx + ib * ty)], dim=-1)
    row1 = torch.stack([ic, id_, -(ic * tx + id_ * ty)], dim=-1)
    return torch.stack([row0, row1], dim=-2)


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, (N, C, H, W), align_corners=False)`` as one matrix product.

    PyTorch's version multiplies a per-sample copy of the base grid in a batched
    product of inner size 3; here the base grid is made once per size and the
    whole batch is one product. Exact to PyTorch's (tested).
    """
    n = theta.shape[0]
    theta = full_precision(theta)
    base = _base_grid(height, width, theta.dtype, theta.device)
    with torch.autocast(theta.device.type, enabled=False):
        grid = torch.mm(theta.reshape(n * 2, 3), base)  # (N * 2, H * W): row 2n is x, row 2n + 1 is y
    return grid.view(n, 2, height, width).permute(0, 2, 3, 1)


@functools.lru_cache(maxsize=16)
def _base_grid(height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(3, H * W): the pixel centres' x, y on the [-1, 1] grid (align_corners=False), and ones."""
    with torch.inference_mode(False):  # cached: it must also serve steps that record gradients
        return _make_base_grid(height, width, dtype, device)


def _make_base_grid(height, width, dtype, device):
    xs = (torch.arange(width, dtype=dtype, device=device) * 2 + 1) / width - 1
    ys = (torch.arange(height, dtype=dtype, device=device) * 2 + 1) / height - 1
    return torch.stack([xs.repeat(height), ys.repeat_interleave(width), torch.ones_like(ys).repeat_interleave(width)])


def warp(image: torch.Tensor, theta: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Sample (N, 1, H, W) images at theta(canvas grid) on a size x size canvas (default H x W): bilinear,
    zeros outside; in at least float32. Coordinates are on the [-1, 1] grid, so theta means the
    same placement whatever the two sizes."""
    height, width = (size, size) if size is not None else image.shape[-2:]
    grid = affine_grid(theta, height, width)
    with torch.autocast(grid.device.type, enabled=False):
        return F.grid_sample(full_precision(image), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def patch_box(theta: torch.Tensor, size: int) -> torch.Tensor:
    """(..., 2, 3) theta -> (..., 4) the box (x0, y0, x1, y1), in pixels of a size x size canvas (0 at
    the left and top edges), around the region where ``place(., theta, size)`` draws a patch: the
    bounding box of the patch's corners mapped onto the canvas."""
    inverse = invert_theta(full_precision(theta))
    corners = theta.new_tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    points = torch.einsum("...ij,kj->...ki", inverse, corners.to(inverse.dtype))  # (..., 4 corners, xy)
    pixels = (points + 1) * size / 2
    low, high = pixels.min(-2).values, pixels.max(-2).values
    return torch.cat([low, high], -1)


def place(patch: torch.Tensor, theta: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Draw a (N, 1, H, W) patch onto an empty size x size canvas (default: the patch's size) under theta."""
    return warp(patch, theta, size)


def crop(image: torch.Tensor, theta: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Zoom into the region of ``image`` where ``place(., theta)`` puts a patch, as a size x size window
    (default: the image's size): place's inverse."""
    return warp(image, invert_theta(theta), size)
