"""Lazy package exports (PEP 562), the one way packages here expose their names.

Importing a package should cost nothing: the ``step-infra`` command imports every package's
``cli`` module at start, and most packages' names pull in torch, pandas or zmq. So a
package lists its names with the module that defines each, and a module-level
``__getattr__`` imports that module on first use::

    _EXPORTS = {"Recorder": "recorder", ...}
    __all__ = sorted(_EXPORTS)

    def __getattr__(name: str) -> Any:
        return lazy_attribute(__name__, _EXPORTS, name)

(A package where a name is also a submodule's, ``kernels.flash_attention`` or
``emulator.search``, imports eagerly: a loaded submodule would replace the function.)
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def lazy_attribute(package: str, exports: Mapping[str, str], name: str) -> Any:
    """``name`` from its module ``package.exports[name]``; AttributeError for other names."""
    module = exports.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{package}.{module}"), name)
