"""The one exception the data pipeline raises for bad input.

It subclasses ValueError so callers that already treat bad configuration as a ValueError
keep working, and it always carries a one-line message that names the culprit (source,
file, line or byte offset): the point is that a user can fix the input without a traceback.
"""
from __future__ import annotations


class DataError(ValueError):
    """A source, file, tokenizer or cursor the pipeline cannot use. `key`, when known, is
    the config key to fix (data.sources.NAME.paths.J)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key
