"""softcache: run the teacher once, distill many students from its cached outputs."""
from __future__ import annotations

__version__ = "0.1.0"

from softcache.errors import SoftcacheError

__all__ = ["SoftcacheError", "__version__"]
