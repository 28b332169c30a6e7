"""Every guide runs as written: its bash blocks in order, then its Python blocks, from a folder
laid out like a checkout (with ../shared beside it)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA

GUIDES = sorted((REPO / "guides").glob("*.md"))


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("guide", GUIDES, ids=[g.name for g in GUIDES])
def test_guide_runs_as_written(guide, tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent)
    env = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    text = guide.read_text()
    script = "set -euo pipefail\n" + "\n".join(blocks(text, "bash"))
    out = subprocess.run(["bash", "-c", script], cwd=checkout, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for code in blocks(text, "python"):
        out = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=dict(env, PYRO_RNP_DATA=str(SHARED_DATA)),
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]


def test_readme_python_runs_as_written():
    """The README's Python (a shipped run used without training) runs from the checkout as written."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found")
    code = "\n".join(blocks((REPO / "README.md").read_text(), "python"))
    assert "load_run" in code
    check = "\nassert tree.placed.shape == (8, 4, 1, 28, 28) and len(tree.children) == 4, tree.placed.shape\n"
    out = subprocess.run([sys.executable, "-c", code + check], cwd=REPO,
                         env=dict(os.environ, PYRO_RNP_DATA=str(SHARED_DATA)), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


DOCS = [REPO / "README.md", REPO / "runs" / "README.md", *GUIDES]


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_every_relative_link_names_a_file_in_the_checkout(doc):
    """A link to a run folder, figure or guide that was renamed or never committed is caught here."""
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
    missing = [t for t in targets if "://" not in t and not (doc.parent / t).exists()]
    assert not missing, missing
