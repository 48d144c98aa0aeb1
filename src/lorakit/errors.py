"""Warning class shared by lorakit; errors are the standard ValueError/TypeError/FileNotFoundError."""

from __future__ import annotations


class LorakitWarning(UserWarning):
    """A warning raised by lorakit itself (tests turn these into errors)."""
