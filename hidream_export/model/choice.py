"""`Choice`: a module attribute that only takes one of a fixed set of names (MoE lowering, RoPE dtype)."""

from __future__ import annotations

from typing import Iterable


class Choice:
    """A data descriptor: reading gives the current name, assigning anything outside `choices` raises
    ValueError naming `label` and the allowed names. Works on nn.Modules (strings are plain attributes)."""

    def __init__(self, choices: Iterable[str], label: str):
        self.choices = tuple(choices)
        self.label = label

    def __set_name__(self, owner, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.__dict__[self.slot]

    def __set__(self, obj, value: str) -> None:
        if value not in self.choices:
            raise ValueError(f"{self.label} must be one of {list(self.choices)}, got {value!r}")
        obj.__dict__[self.slot] = value
