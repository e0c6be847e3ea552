"""The error every config check raises, and the helper that words it (torch-free)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid. The message names the field, the problem and the fix."""


def require(ok: bool, field_name: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {problem}. Fix: {fix}")
