"""Figures: the parse at every level, prior samples, and the command's errors."""
import json
import subprocess
import sys

import matplotlib.image
import torch

from conftest import REPO, SHARED_DATA, tiny_config
from pyro_rnp import RNP
from pyro_rnp.figures import colour_parts, plot_parse
from pyro_rnp.fit import train


def test_parts_get_the_papers_colours():
    placed = torch.zeros(1, 4, 1, 28, 28)
    for t in range(4):
        placed[0, t, 0, t, t] = 1.0
    rgb = colour_parts(placed)
    assert rgb.shape == (1, 28, 28, 3)
    blue, red, green, orange = (rgb[0, t, t] for t in range(4))
    assert blue.argmax() == 2 and red.argmax() == 0 and green.argmax() == 1
    assert orange[0] == 1.0 and 0.5 < orange[1] < 0.7 and orange[2] == 0.0


def test_parse_figure_has_a_row_per_level(tmp_path, fashion_images):
    rnp = RNP(tiny_config(depth=3, steps=2)).eval()
    path = plot_parse(rnp, fashion_images[:2], tmp_path / "parse.png")
    image = matplotlib.image.imread(path)
    assert image.shape[0] > image.shape[1]  # 2 images x 3 levels of rows, at most 4 boxes across


def test_figures_command(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(limit=32, epochs=1, eval_limit=8), run_dir, torch.device("cpu"), SHARED_DATA,
          download=False, progress=False)
    out = subprocess.run([sys.executable, "-m", "pyro_rnp.figures", str(run_dir), "--n", "3", "--tsne-images", "30",
                          "--data-dir", str(SHARED_DATA), "--no-download"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    for name in ("parse.png", "samples.png", "tsne.png"):
        assert (run_dir / "figures" / name).stat().st_size > 1000
    probe = json.loads((run_dir / "figures.json").read_text())["tsne"]
    assert 0 <= probe["probe_accuracy"] <= 1
    assert probe["n_level_2"] == 30 and probe["n_level_1"] == 30 * 3  # tiny_config: 3 children per program
    bad = subprocess.run([sys.executable, "-m", "pyro_rnp.figures", str(run_dir), "--which", "parse,nope"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "unknown figure nope" in bad.stderr and "parse, samples" in bad.stderr
    foreign = subprocess.run([sys.executable, "-m", "pyro_rnp.figures", str(tmp_path)],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert foreign.returncode == 1 and "not a pyro_rnp run folder" in foreign.stderr
    assert "Traceback" not in bad.stderr + foreign.stderr
