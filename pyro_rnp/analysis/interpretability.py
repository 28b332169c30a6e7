"""One interpretability score for every model's primitives: the sparse AND-OR paper's template matching.

A model's primitives, drawn as images (``model_primitives``):
  rnp           "parts": each top-level part placed on the canvas, and "leaves": each leaf patch in its
                own frame (the leaf program's decoded drawing), parsed from the first images given;
  air, dmvae    "parts": each present object's window placed on the canvas;
  vae           "decoder units": decode(2 e_j) - decode(0) for every latent unit j;
  sparse-andor  "layer 3 basis functions" (the paper's Table 4 layer): what one active unit of
                the layer draws alone, minus what the generator draws from nothing (its biases), and
                "layer 3 basis functions in context": what the unit adds to the image, of those it
                is drawn from, where it is most active (SparseAndOr.basis_functions).
Each drawing is cropped to its ink (the box of pixels whose magnitude passes INK of its largest;
drawings that draw nothing visible, crops narrower than MIN_SIDE pixels and crops without spread
are dropped), and the score is the mean, over the first MAX_PRIMITIVES primitives and the
``images`` given (training images), of the best normalised cross-correlation of the crop anywhere
in the image (scikit-image's ``match_template``): 1 for a primitive that is a patch of an image,
near 0 for noise.
"""
from __future__ import annotations

import textwrap

import numpy as np
import torch
from skimage.feature import match_template

from ..model.registry import has

INK = 0.2             # a drawing's pixels with |value| >= INK * its largest |value| make its crop
VISIBLE = 0.05        # a drawing whose largest |value| is below this (pixels in [0, 1]) draws nothing: dropped
MIN_SIDE = 5          # a crop narrower than this is dropped: a 2-pixel template matches some edge of any image
MAX_PRIMITIVES = 64   # primitives scored per kind (the first ones)
DRAWN_FROM = 16       # images parsed for the primitives of the models with parts


def crop_to_ink(drawing: np.ndarray) -> np.ndarray | None:
    """The smallest box of ``drawing`` (H, W) holding every pixel with |value| >= INK * max |value|, or
    None for a drawing that cannot be matched meaningfully: one that draws nothing visible (max |value|
    below VISIBLE), a crop narrower than MIN_SIDE, or a constant crop (no spread, no correlation)."""
    magnitude = np.abs(drawing)
    if magnitude.max() < VISIBLE:
        return None
    rows, cols = np.nonzero(magnitude >= INK * magnitude.max())
    crop = drawing[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return crop if min(crop.shape) >= MIN_SIDE and crop.std() > 1e-8 else None


def template_matching_score(drawings: torch.Tensor, images: torch.Tensor) -> dict:
    """drawings (P, H, W) or (P, 1, H, W), images (M, H, W) or (M, 1, H', W') -> {"score": the mean over
    the kept primitives and the images of the best NCC of the primitive's ink crop in the image,
    "per_primitive": each primitive's mean over the images, "primitives": how many were kept (the first
    MAX_PRIMITIVES that crop_to_ink keeps), "images": M}."""
    drawings = drawings.detach().float().cpu().reshape(drawings.shape[0], *drawings.shape[-2:]).numpy()
    images = images.detach().float().cpu().reshape(images.shape[0], *images.shape[-2:]).numpy()
    templates = [t for t in (crop_to_ink(d) for d in drawings) if t is not None][:MAX_PRIMITIVES]
    if not templates:
        return {"score": float("nan"), "per_primitive": [], "primitives": 0, "images": int(images.shape[0])}
    per_primitive = [float(np.mean([match_template(image, template).max() for image in images]))
                     for template in templates]
    return {"score": float(np.mean(per_primitive)), "per_primitive": per_primitive,
            "primitives": len(templates), "images": int(images.shape[0])}


@torch.no_grad()
def model_primitives(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{kind: drawings (P, H, W)} of the model's primitives (the module docstring), from images x (N, 1, H, W)
    (the first DRAWN_FROM are parsed; the sparse AND-OR generator infers its unit strengths from them)."""
    was_training = model.training
    model.eval()
    try:
        x = x[:DRAWN_FROM] if x.shape[0] > DRAWN_FROM else x  # the same tensor keeps the generator's inference
        if has(model, "basis"):
            return {"layer 3 basis functions": model.basis_functions(3, x)[:, 0],
                    "layer 3 basis functions in context": model.basis_functions(3, x, in_context=True)[:, 0]}
        if has(model, "programs"):
            tree = model.parse(x)
            leaves = torch.cat([node.patches.flatten(0, 1) for node in tree.levels()[-1]])
            return {"parts": tree.placed.flatten(0, 1)[:, 0], "leaves": leaves[:, 0]}
        if has(model, "parts"):
            parts = model.parts(x)
            present = parts.present if parts.present is not None else torch.ones(parts.placed.shape[:2], dtype=bool)
            return {"parts": parts.placed[present.to(parts.placed.device)][:, 0]}
        if hasattr(model, "decode"):  # a decoder from a latent vector: what each unit draws
            z_dim = model.config.z_dim
            z = torch.cat([torch.zeros(1, z_dim), 2 * torch.eye(z_dim)]).to(x.device)
            canvas = model.likelihood.mean(model.decode(z, record=False).canvas)
            return {"decoder units": (canvas[1:] - canvas[:1])[:, 0]}
    finally:
        model.train(was_training)
    raise ValueError(f"the {model.config.model} model draws no primitives that this score knows")


def score_primitives(drawings: dict[str, torch.Tensor], images: torch.Tensor, drawn_from: int) -> dict:
    """{kind: template_matching_score(...) without per_primitive, plus "drawn_from"} for drawings by kind
    (model_primitives) matched against ``images``."""
    result = {}
    for kind, d in drawings.items():
        score = template_matching_score(d, images)
        score.pop("per_primitive")
        result[kind] = {**score, "drawn_from": int(min(DRAWN_FROM, drawn_from))}
    return result


def _normalised(drawings: torch.Tensor) -> np.ndarray:
    """(P, H, W) drawings, each stretched to [0, 1] for display (a basis function is a signed difference)."""
    d = drawings.detach().float().cpu()
    low, high = d.flatten(1).amin(1)[:, None, None], d.flatten(1).amax(1)[:, None, None]
    return ((d - low) / (high - low).clamp_min(1e-8)).numpy()


def plot_primitives(model, x: torch.Tensor, images: torch.Tensor, path, columns: int = 12) -> tuple:
    """The first ``columns`` primitives of each kind (model_primitives), each stretched to [0, 1], with the
    kind's template-matching score in its label -> (path, score_primitives(...))."""
    from .plots import image_grid
    drawings = model_primitives(model, x)
    scores = score_primitives(drawings, images, x.shape[0])
    rows = []
    for kind, d in drawings.items():
        score = f"score {scores[kind]['score']:.2f}" if scores[kind]["primitives"] else "none scored"
        rows.append(("\n".join(textwrap.wrap(kind, 14)) + "\n" + score, _normalised(d[:columns])))
    path = image_grid(rows, path, f"primitives ({model.config.model}): template-matching score against "
                                  f"{images.shape[0]} training images")
    return path, scores


@torch.no_grad()
def plot_basis(model, x: torch.Tensor, path, units: int = 12) -> tuple:
    """The AND-OR dictionary: for every layer of the sparse generator, what one active unit draws alone and
    what it adds to the image (of x) where it is most active, for its ``units`` strongest channels (by
    their mean largest activation on images x) -> (path, summary)."""
    from .plots import image_grid
    rows, summary = [], {}
    for layer in model.generator.LAYERS:
        alone = model.basis_functions(layer, x, units)[:, 0]
        in_context = model.basis_functions(layer, x, units, in_context=True)[:, 0]
        rows += [(f"layer {layer}\nalone", _normalised(alone)),
                 (f"layer {layer}\nin an image", _normalised(in_context))]
        summary[f"layer {layer}"] = {"units_drawn": int(alone.shape[0])}
    title = (f"basis functions ({'top-k sparse' if model.generator.sparse else 'dense'} generator): "
             "what one active unit draws alone, and adds to the image where it is most active")
    return image_grid(rows, path, title), summary
