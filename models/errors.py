"""The one error type users see: a single line that names the file and the fix."""

from __future__ import annotations


class HuatuoError(Exception):
    """A user-facing failure. The CLI prints `error: <message>` and exits non-zero, no traceback."""

    exit_code = 1


class UnsupportedModelError(HuatuoError):
    """The checkpoint is not a layout huatuo-local knows how to convert."""


class CheckpointError(HuatuoError):
    """The checkpoint's files are missing, truncated or inconsistent."""
