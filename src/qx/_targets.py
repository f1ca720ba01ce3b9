"""``"package.module:attribute"`` targets: how the command line finds a service's objects
(its metadata for migrations, its event router and unit of work for ``qx inbox run``)."""

from __future__ import annotations

import importlib
import re
from typing import Any

from qx.core._errors import ConfigurationError

__all__ = ["load_target"]

_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def load_target(target: str, *, what: str, expected: type | tuple[type, ...], hint: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute, checked against
    ``expected`` (a type; a class when ``expected`` is a tuple holding ``type``).

    Raises:
        ConfigurationError: a malformed target, a module that does not import, or an
            attribute that is missing or not what was expected (the message names which).
    """
    if not isinstance(target, str) or not _TARGET.fullmatch(target):
        raise ConfigurationError(
            f"{what} must look like 'package.module:attribute', got {str(target)[:200]!r}"
        )
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"cannot import {module_name!r} for the {what} ({exc}); run qx from the "
            "service's root, or fix the module path"
        ) from exc
    found = getattr(module, attribute, None)
    if not isinstance(found, expected):
        kind = "has no attribute" if found is None else f"has {type(found).__name__} as"
        raise ConfigurationError(f"{module_name} {kind} {attribute!r}: expected {hint}")
    return found
