"""The one error growth raises: an impossible target or option, naming its field."""
from __future__ import annotations


class GrowthError(ValueError):
    """An impossible growth target; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
