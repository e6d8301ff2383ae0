"""`package.module:callable` specs (user models, user augmentation pipelines), resolved in one place."""
from __future__ import annotations

import importlib
from typing import Any


def import_callable(spec: str) -> Any:
    """The object `attr` of `package.module:attr`; the import's own exception (of any kind) propagates, for the
    caller to word as one line."""
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)
