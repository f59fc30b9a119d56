"""revify: make PyTorch training fit in less activation memory.

The public names are imported on first use: ``import revify`` (and
``revify --help``) then costs milliseconds, not the seconds torch, its
compiler stack, sympy and transformers take to import; the first call of
``revify.revify`` pays them once.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {  # name -> module that defines it
    "revify": "revify.api", "inspect": "revify.api", "stored_activations": "revify.api",
    "RevifyError": "revify.api", "BudgetError": "revify.api",
    "load": "revify.checkpoint_io", "save": "revify.checkpoint_io",
    "estimate": "revify.estimate", "report": "revify.report",
    "ReconstructionError": "revify.runtime.reconstruction",
}
__all__ = ["revify", "inspect", "report", "estimate", "save", "load", "stored_activations", "RevifyError",
           "BudgetError", "ReconstructionError"]


class _Package(types.ModuleType):
    """The package module: public names resolve on first access.

    ``revify.report`` and ``revify.estimate`` name both a function and the
    submodule defining it. Importing a submodule sets it as an attribute of
    the package; for these names the function must win, as it did when this
    file imported it eagerly, so such a module never replaces the function.
    """

    def __getattr__(self, name: str) -> Any:
        module = _PUBLIC.get(name)
        if module is None:
            raise AttributeError(f"module 'revify' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return  # a submodule import: the function of that name stays the attribute
        types.ModuleType.__setattr__(self, name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_PUBLIC))


sys.modules[__name__].__class__ = _Package
