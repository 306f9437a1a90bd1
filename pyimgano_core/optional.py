"""Lazy import of optional dependencies with an install hint naming the extra."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import OptionalDependencyError


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise an error telling the user which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise OptionalDependencyError(
            f"'{module}' is required for this feature but is not installed "
            f"({exc}); install it with: pip install \"pyimgano[{extra}]\""
        ) from None
