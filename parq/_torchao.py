"""The optional ``torchao`` dependency: one place that imports it and says how to get it.

``parq`` imports with torch alone (SPEC.md §13). The torchao surface of SPEC.md §1
(``UnifTorchaoQuantizer`` and friends, ``StretchedIntxWeightConfig``, ``parq.api``'s
defaults, ``QuantOptimizer.torchao_convert``) imports torchao on first use; without
it, that use raises an ``ImportError`` that names the install command.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

TORCHAO_VERSION = "0.18.0"  # the release the extra pins and the tests run against
TORCHAO_INSTALL = 'pip install "torchao==0.18.0"'


def torchao_missing(what: str, cause: BaseException | None = None) -> ImportError:
    """The error for ``what`` (a name the user touched) when torchao cannot be imported."""
    message = (
        f"{what} needs the optional torchao package (parq is tested with "
        f"torchao=={TORCHAO_VERSION}); install it with: {TORCHAO_INSTALL}"
    )
    if cause is not None:
        message += f" [import failed: {type(cause).__name__}: {cause}]"
    return ImportError(message, name="torchao")


def require_torchao(what: str) -> ModuleType:
    """``import torchao``, or :func:`torchao_missing` for ``what``."""
    try:
        return importlib.import_module("torchao")
    except ImportError as exc:
        raise torchao_missing(what, exc) from exc


def lazy_torchao_attribute(owner: str, name: str, sources: dict[str, str]) -> Any:
    """Module ``__getattr__`` body: ``name`` from the module ``sources[name]`` (which
    imports torchao), or ``AttributeError`` when ``owner`` has no such lazy name.

    Nothing is cached in ``owner``, so a later call sees torchao appear or vanish.
    """
    module_name = sources.get(name)
    if module_name is None:
        raise AttributeError(f"module {owner!r} has no attribute {name!r}")
    require_torchao(f"{owner}.{name}")
    return getattr(importlib.import_module(module_name), name)


__all__ = [
    "TORCHAO_VERSION",
    "TORCHAO_INSTALL",
    "torchao_missing",
    "require_torchao",
    "lazy_torchao_attribute",
]
