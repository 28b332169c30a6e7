"""The named priors, guides and decoders an RNP is built from, and how a user adds one.

A component is a ``torch.nn.Module`` built by a function ``build(config, **parts)``
registered under a name. The name goes into ``RNPConfig`` (``prior=``, ``guide=``,
``decoder=``), so a run folder says what it was built from and ``load_run`` can
build it again. The protocols:

  prior    ``forward() -> Distribution`` over z, event shape (z_dim,). Built with
           ``build(config, guide=...)`` (the VampPrior reads the guide).
  guide    ``forward(x) -> Distribution`` q(z | x), batch shape (B,), event shape (z_dim,);
           ``point(x) -> Tensor`` (B, z_dim), the single z used to parse and reconstruct.
           Built with ``build(config)``.
  decoder  ``forward(z, target=None, part_error=None, record=False) -> ExecutorOutput``
           for z of shape (*B, z_dim). Built with ``build(config)``.

The model owns the Pyro sample statements, so whatever the components, the latent
site is ``"z"`` in the ``"data"`` plate and ``Predictive``, ``poutine`` and the
evaluation commands work unchanged.

A user's components live in their own module: decorate the builder with
``register_prior``/``register_guide``/``register_decoder`` and pass the module to
``fit --plugin`` (it is recorded in the config and imported again on load).
"""
from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys
from typing import Callable

KINDS = ("prior", "guide", "decoder")
_REGISTRY: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}


def _register(kind: str, name: str):
    def decorate(build: Callable) -> Callable:
        _REGISTRY[kind][name] = build
        return build
    return decorate


def register_prior(name: str):
    """Decorator: ``build(config, guide) -> nn.Module`` whose call returns a distribution over z."""
    return _register("prior", name)


def register_guide(name: str):
    """Decorator: ``build(config) -> nn.Module`` with ``forward(x) -> q(z | x)`` and ``point(x)``."""
    return _register("guide", name)


def register_decoder(name: str):
    """Decorator: ``build(config) -> nn.Module`` mapping z to an ExecutorOutput."""
    return _register("decoder", name)


def names(kind: str) -> list[str]:
    _load_builtins()
    return list(_REGISTRY[kind])


def build(kind: str, name: str, config, **parts):
    """The component ``name`` of ``kind``; an unknown name is refused with the valid ones."""
    _load_builtins()
    try:
        builder = _REGISTRY[kind][name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {', '.join(_REGISTRY[kind])} "
                         f"(or register your own: see guides/writing-your-own-guide.md)") from None
    return builder(config, **parts)


def import_plugin(spec: str) -> None:
    """Import a user's module of components: a dotted module name or a path to a .py file."""
    path = pathlib.Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise ValueError(f"plugin {spec} not found; pass a .py file or an importable module name")
        name = f"pyro_rnp_plugin_{path.stem}"
        if name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return
    try:
        importlib.import_module(spec)
    except ImportError as e:
        raise ValueError(f"cannot import plugin {spec!r} ({e}); pass a .py file or an importable module") from None


def _load_builtins() -> None:
    # the built-in components register themselves on import
    from . import decoders, guides, priors  # noqa: F401
