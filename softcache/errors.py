"""The one exception type for wrong input; the CLI prints it as a single line."""
from __future__ import annotations


class SoftcacheError(Exception):
    """Bad input or a refused action: the message names what is wrong and what would be right."""
