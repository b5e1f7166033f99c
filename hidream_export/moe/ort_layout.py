"""Where the `ort` lowering keeps each routed expert's weights: torch-free, so the runtime can find and
change them (load-time LoRA) without the exporter's torch op (hidream_export/moe/ort_moe.py).

Each MoE layer's experts live in two initializers named after the contrib op's inputs:

    <layer>.experts.fc1_experts_weights  (E, 2I, D)  expert e's w1 and w3 rows interleaved [g0, u0, g1, u1, ...]
    <layer>.experts.fc2_experts_weights  (E, D, I)   expert e's w2

so checkpoint weight `<layer>.experts.<e>.<w>.weight` is the rows `part::parts` of `stack[e]`, where
`part` is its place among the expert's sources (w1 0 and w3 1 of 2 in fc1; w2 0 of 1 in fc2). The model's
`swiglu_fused_rows` writes the fc1 interleaving; a test checks that the two agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FC1, FC2 = "fc1_experts_weights", "fc2_experts_weights"
_FUSED = re.compile(rf"^(?P<layer>.+\.experts)\.(?P<input>{FC1}|{FC2})$")


@dataclass(frozen=True)
class ExpertRows:
    """One checkpoint weight inside a fused initializer: rows `part::parts` of `stack[expert]`."""

    name: str  # the fused initializer
    expert: int
    part: int
    parts: int


@dataclass(frozen=True)
class FusedWeight:
    """One fc1/fc2 initializer and the checkpoint tensors it is made of, per expert in order:
    (w1, w3) row-interleaved for fc1, (w2,) for fc2."""

    name: str
    input: str  # FC1 or FC2
    sources: tuple[tuple[str, ...], ...]

    def rows(self) -> dict[str, ExpertRows]:
        """checkpoint key -> where its rows are in this initializer."""
        return {key: ExpertRows(self.name, e, part, len(keys))
                for e, keys in enumerate(self.sources) for part, key in enumerate(keys)}


def fused_weight(name: str, num_experts: int) -> FusedWeight | None:
    """The sources of a fused initializer name (None for any other name)."""
    match = _FUSED.match(name)
    if match is None:
        return None
    layer, which = match["layer"], match["input"]
    parts = ("w1", "w3") if which == FC1 else ("w2",)
    return FusedWeight(name, which, tuple(tuple(f"{layer}.{e}.{p}.weight" for p in parts)
                                          for e in range(num_experts)))
