"""Plain data: JSON-canonical values and flattened trees (torch-free, used by every layer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def plain(value: Any) -> Any:
    """A JSON-canonical copy: mappings (OmegaConf's included) -> dicts with sorted string keys,
    sequences -> lists, numpy scalars -> Python numbers, other objects -> their ``str``."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): plain(v) for k, v in sorted(value.items())}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Sequence):  # lists, tuples, OmegaConf's ListConfig
        return [plain(v) for v in value]
    if hasattr(value, "item"):  # numpy / pandas scalars
        return value.item()
    return str(value)


def flatten(tree: dict[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": leaf}`` (``sep`` between the keys); other values are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, sep, f"{name}{sep}"))
        else:
            flat[name] = value
    return flat


def numeric_leaves(tree: dict[str, Any], sep: str = ".") -> dict[str, Any]:
    """``flatten(tree, sep)`` keeping only numbers, bools and None (what a table or a W&B
    summary holds; text and lists are left out)."""
    return {name: value for name, value in flatten(tree, sep).items()
            if isinstance(value, bool | int | float) or value is None}


def multiple_name(multiple: float) -> str:
    """An inference budget as a multiple of the training k, as a metric-name part that matches
    ``[_a-zA-Z0-9]`` (W&B sorts and filters only such names): 1 -> ``k``, 2 -> ``k_x2``,
    0.25 -> ``k_div4``, 0.75 -> ``k_x0p75``."""
    if multiple == 1:
        return "k"
    if float(multiple).is_integer():
        return f"k_x{int(multiple)}"
    inverse = 1 / multiple
    if abs(inverse - round(inverse)) < 1e-9:
        return f"k_div{round(inverse)}"
    return f"k_x{multiple:g}".replace(".", "p")
