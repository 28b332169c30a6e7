"""The package's layers import one way: data <- model <- fast <- training <- analysis <- commands."""
import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pyro_rnp"
LAYERS = ["data", "model", "fast", "training", "analysis"]  # then the commands: the package's top-level modules
COMMANDS = len(LAYERS)


def layer_of(module: str) -> int:
    """The layer of a module inside the package, from its dotted path below pyro_rnp."""
    first = module.split(".")[0]
    return LAYERS.index(first) if first in LAYERS else COMMANDS


def imports_of(path: pathlib.Path) -> list[str]:
    """Every pyro_rnp module that ``path`` imports, as dotted paths below pyro_rnp (imports inside
    functions included)."""
    package = list(path.relative_to(PACKAGE).parts[:-1])  # the folder the module is in, below pyro_rnp
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name]) for a in node.names]
                found += [n for n in names if n]
                if not node.module:
                    continue
            elif node.module and node.module.startswith("pyro_rnp"):
                found.append(node.module[len("pyro_rnp."):] if node.module != "pyro_rnp" else "")
        elif isinstance(node, ast.Import):
            found += [a.name[len("pyro_rnp."):] for a in node.names if a.name.startswith("pyro_rnp.")]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(path):
    own = layer_of(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    if path == PACKAGE / "__init__.py":
        own = COMMANDS  # the package's front door re-exports the model layer and reads run folders
    upward = [m for m in imports_of(path) if m and layer_of(m) > own]
    assert not upward, f"{path.relative_to(PACKAGE)} (layer {own}) imports from above: {upward}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_long(path):
    assert len(path.read_text().splitlines()) <= 400, f"{path.relative_to(PACKAGE)}: split it by what it does"


def test_the_model_layer_loads_no_ui_plotting_or_speed_code():
    """Importing the model layer (and building and running an RNP) loads neither click, matplotlib, tqdm
    nor the fast layer, beyond what torch and pyro load themselves: ``import torch`` loads tqdm (through
    torch.hub) and ``import pyro`` loads tqdm.auto (through pyro.infer), so a model written in Pyro cannot
    avoid those; the model layer adds none."""
    code = ("import sys, torch, pyro, pyro.infer\n"
            "def loaded():\n"
            "    return {m for m in sys.modules if m.split('.')[0] in ('click', 'matplotlib', 'tqdm')"
            " or m.startswith('pyro_rnp.fast')}\n"
            "before = loaded()\n"
            "from pyro_rnp.model import RNP, RNPConfig, build_model\n"
            "model = build_model(RNPConfig(z_dim=8, hidden=16, embed=8, action_hidden=8, steps=2,"
            " encoder_blocks=1, encoder_hidden=16))\n"
            "model.reconstruct(torch.rand(2, 1, 28, 28))\n"
            "print(sorted(loaded() - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_old_import_paths_of_plugins_still_work():
    """Plugins written before the layers (``from pyro_rnp.components import register_guide``) keep working."""
    code = ("from pyro_rnp.components import register_guide, register_prior\n"
            "from pyro_rnp.guides import DiagonalNormalGuide\n"
            "from pyro_rnp.priors import MixturePrior\n"
            "import pyro_rnp.model.components as c\n"
            "assert register_guide is c.register_guide\n")
    subprocess.run([sys.executable, "-c", code], check=True)
