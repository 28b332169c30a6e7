import math

import torch

from pyro_rnp.model.spatial import action_to_theta, crop, invert_theta, place


def random_theta(n, generator):
    """Actions as the model makes them: sin-bounded, so rotation, shear, scale and shift all vary."""
    return action_to_theta(torch.sin(3 * torch.randn(n, 6, generator=generator)), 3.3)


def test_action_offset_adds_scale_to_the_diagonal():
    theta = action_to_theta(torch.zeros(2, 6), 3.3)
    assert torch.allclose(theta, torch.tensor([[3.3, 0, 0], [0, 3.3, 0]]).expand(2, 2, 3))


def test_invert_theta_is_the_true_inverse_under_rotation_and_shear():
    g = torch.Generator().manual_seed(0)
    theta = random_theta(64, g)
    inv = invert_theta(theta)
    bottom = torch.tensor([0.0, 0.0, 1.0]).expand(64, 1, 3)
    full = torch.cat([theta, bottom], 1)
    full_inv = torch.cat([inv, bottom], 1)
    assert torch.allclose(full @ full_inv, torch.eye(3).expand(64, 3, 3), atol=1e-5)
    # the authors' diagonal-only inverse is not it when off-diagonal terms are present
    assert theta[:, 0, 1].abs().max() > 0.5


def test_place_then_crop_is_close_to_identity_on_interior_patches():
    g = torch.Generator().manual_seed(1)
    n = 32
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    centre = 0.4 * (torch.rand(n, 2, generator=g) - 0.5)
    width = 0.35 + 0.1 * torch.rand(n, 1, 1, generator=g)
    # smooth blobs well inside the patch: what survives a 2.3-4.3x shrink and bilinear resampling
    patch = torch.exp(-((xs - centre[:, 0, None, None]) ** 2 + (ys - centre[:, 1, None, None]) ** 2)
                      / (2 * width ** 2)).unsqueeze(1)
    theta = random_theta(n, g)
    canvas = place(patch, theta)
    assert canvas.sum() > 0 and canvas.sum() < patch.sum()  # the patch shrank onto the canvas
    back = crop(canvas, theta)
    interior = (xs.abs() < 0.6) & (ys.abs() < 0.6)
    error = (back - patch)[:, 0][:, interior].abs()
    assert error.mean() < 0.03, error.mean()
    assert error.max() < 0.2, error.max()


def test_children_are_smaller_than_their_parent():
    g = torch.Generator().manual_seed(2)
    theta = random_theta(256, g)
    area_ratio = torch.linalg.det(theta[:, :, :2]).abs()  # canvas area per unit of patch area
    assert area_ratio.min() > 1.0
    assert math.isclose(float(action_to_theta(torch.zeros(1, 6), 3.3)[0, 0, 0]), 3.3, rel_tol=1e-6)


def test_affine_grid_matches_pytorch():
    import torch.nn.functional as F
    from pyro_rnp.model.spatial import affine_grid
    theta = random_theta(7, torch.Generator().manual_seed(3)).double()
    expected = F.affine_grid(theta, [7, 1, 28, 20], align_corners=False)
    assert torch.allclose(affine_grid(theta, 28, 20), expected, atol=1e-12)


def test_patch_box_is_where_place_draws_on_a_larger_canvas():
    from pyro_rnp.model.spatial import patch_box
    theta = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]], [[2.5, 0.0, -0.5], [0.0, 2.0, 1.0]]])
    box = patch_box(theta, 50)
    assert torch.allclose(box[0], torch.tensor([12.5, 12.5, 37.5, 37.5]))
    drawn = place(torch.ones(2, 1, 28, 28), theta, 50)[:, 0]
    for image, (x0, y0, x1, y1) in zip(drawn, box.tolist()):
        ys, xs = torch.nonzero(image > 0.5, as_tuple=True)  # pixel centres at i + 0.5 in box units
        assert x0 - 1 <= xs.min() + 0.5 and xs.max() + 0.5 <= x1 + 1
        assert y0 - 1 <= ys.min() + 0.5 and ys.max() + 0.5 <= y1 + 1
        assert abs((xs.max() - xs.min() + 1) - (x1 - x0)) <= 2 and abs((ys.max() - ys.min() + 1) - (y1 - y0)) <= 2
