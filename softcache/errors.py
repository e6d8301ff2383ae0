"""The one exception type for wrong input; the CLI prints it as a single line."""
from __future__ import annotations


class SoftcacheError(Exception):
    """Bad input or a refused action: the message names what is wrong and what would be right."""

    def __init__(self, message: str = ""):
        # A DataLoader worker's error comes back as `SoftcacheError("Caught SoftcacheError in DataLoader worker
        # process 0.\nOriginal Traceback ...: <message>")`: keep the one line the worker raised.
        if message.startswith("Caught SoftcacheError"):
            message = message.rstrip().splitlines()[-1].split("SoftcacheError: ", 1)[-1]
        super().__init__(message)
