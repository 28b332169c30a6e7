"""Figures: the parse at every level, prior samples, and the command's errors."""
import json
import subprocess
import sys

import matplotlib.image
import torch

from conftest import REPO, SHARED_DATA, tiny_config
from pyro_rnp import RNP
from pyro_rnp.analysis.plots import colour_parts, plot_parse
from pyro_rnp.fit import train
from pyro_rnp.analysis.program_space import cluster, gather_programs


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
    for name in ("parse.png", "samples.png", "tsne.png", "clusters.png", "interpolate.png", "library.png"):
        assert (run_dir / "figures" / name).stat().st_size > 1000
    record = json.loads((run_dir / "figures.json").read_text())
    levels = record["library"]["levels"]
    assert set(levels) == {"top-level programs", "level-1 part programs", "leaf programs"}
    for level in levels.values():
        assert abs(sum(level["usage"]) - 1) < 1e-3 and 1 <= level["effective_primitives"] <= level["clusters"]
    probe = record["tsne"]
    assert 0 <= probe["probe_accuracy"] <= 1
    assert probe["n_level_2"] == 30 and probe["n_level_1"] == 30 * 3  # tiny_config: 3 children per program
    bad = subprocess.run([sys.executable, "-m", "pyro_rnp.figures", str(run_dir), "--which", "parse,nope"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "unknown figure nope" in bad.stderr and "parse, samples" in bad.stderr
    foreign = subprocess.run([sys.executable, "-m", "pyro_rnp.figures", str(tmp_path)],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert foreign.returncode == 1 and "not a pyro_rnp run folder" in foreign.stderr
    assert "Traceback" not in bad.stderr + foreign.stderr


def test_programs_are_gathered_at_every_level_and_clusters_cover_them(fashion_images):
    rnp = RNP(tiny_config(depth=3, steps=2)).eval()
    programs = gather_programs(rnp, fashion_images[:5])
    assert [p.level for p in programs] == [3, 2, 1, 0]
    assert [len(p.vectors) for p in programs] == [5, 10, 20, 40]  # 2 children per program
    assert all(p.drawings.shape == (len(p.vectors), 28, 28) for p in programs)
    # a level-1 program's leaves are its recorded child vectors, drawn as the patches it decoded
    tree = rnp.parse(fashion_images[:5])
    torch.testing.assert_close(programs[3].drawings[:2], tree.children[0].children[0].patches[0, :, 0])
    c = cluster(programs[2], k=4)
    assert sorted(set(c.labels.tolist())) == [0, 1, 2, 3] and (c.usage[:-1] >= c.usage[1:]).all()
    assert all(c.labels[m] == j for j, m in enumerate(c.medoids))
    # the drawing of a part program run on its own is what it drew inside its parent
    own = rnp.executor.draw(tree.children[0].z, level=2)
    torch.testing.assert_close(own, tree.children[0].canvas)
