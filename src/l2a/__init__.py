"""l2a: conditional long-range attention (L2A / AHA) for pretrained LLMs.

`import l2a` is light: it imports neither torch nor transformers, so `l2a --help` and
`from l2a.ops import ...` (ops used inside other models) stay cheap. The model names below load
`l2a.models` on first use.

Registration with transformers' Auto classes (`model_type="l2a"`) happens as soon as both `l2a` and
transformers are imported, in either order: at once when transformers is already loaded, else right after
the first `import transformers`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

__version__ = "0.1.0"

_MODEL_NAMES = ("L2AConfig", "L2AForCausalLM", "L2AModel", "convert_model")

__all__ = [*_MODEL_NAMES, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _MODEL_NAMES:
        return getattr(importlib.import_module("l2a.models"), name)
    raise AttributeError(f"module 'l2a' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODEL_NAMES))


_registration_deferred = False


def _register_models(*, layers_ready: bool = False) -> None:
    global _registration_deferred
    layers = getattr(sys.modules.get("l2a.layers"), "__spec__", None)
    if not layers_ready and getattr(layers, "_initializing", False):
        # transformers was first imported by `l2a.layers` itself (its layers subclass transformers' own);
        # `l2a.models` needs every name of `l2a.layers`, whose import ends with `_register_if_deferred`
        _registration_deferred = True
        return
    try:
        importlib.import_module("l2a.models")  # registers the Auto classes at its import
    except Exception as error:  # a broken optional integration must not break `import transformers`
        warnings.warn(f"l2a: could not register the L2A model with transformers: {error}", stacklevel=2)


def _register_if_deferred() -> None:
    """The registration `_register_models` put off while `l2a.layers` was being imported (called at the end
    of that import, when all its names exist)."""
    global _registration_deferred
    if _registration_deferred:
        _registration_deferred = False
        _register_models(layers_ready=True)


class _RegisteringLoader(importlib.abc.Loader):
    """transformers' own loader, followed by the L2A registration."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _register_models()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _TransformersImportHook(importlib.abc.MetaPathFinder):
    """Finds transformers with the other finders and wraps its loader; removes itself after one use."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


if "transformers" in sys.modules:
    _register_models()
elif not any(isinstance(finder, _TransformersImportHook) for finder in sys.meta_path):
    sys.meta_path.insert(0, _TransformersImportHook())
