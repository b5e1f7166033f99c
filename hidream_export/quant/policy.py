"""Which linear weights a quantized export leaves in the export dtype, and why. Torch-free.

Only 2-D weights that feed a matmul are ever quantized (graph.py finds them); biases, norms and embedding
tables are never matmul weights. Of the transformer's linear weights, these groups stay in the export
dtype (tools/bench_quant.py --policy measures what each group costs when it is quantized too):

    router       every MoE layer's gate (4 x 2560): a quantization error here changes which experts a
                 token runs, the largest error a token can get; 0.003% of the weights
    embedders    timestep, pooled-text and patch embedders: their output conditions every block's
                 modulation (or is the image itself); 0.2% of the weights
    final_layer  the output projection and its modulation: nothing after it averages its error; 0.08%

Everything else is quantized: attention projections, routed and shared experts, the text FFN, every
block's adaLN modulation (15% of the weights: keeping it would cost the int4 size budget) and the 49
caption projections (3%).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class KeptGroup:
    name: str
    patterns: tuple[str, ...]  # fnmatch patterns over checkpoint keys
    why: str


TRANSFORMER_KEPT = (
    KeptGroup("router", ("*.ff_i.gate.weight",),
              "top-2 routing: an error here sends a token through other experts"),
    KeptGroup("embedders", ("t_embedder.*", "p_embedder.*", "x_embedder.*"),
              "conditions every block's modulation (timestep, pooled text) or is the image itself (patches)"),
    KeptGroup("final_layer", ("final_layer.*",), "writes the output directly; no later layer averages its error"),
)


def kept_group(key: str, groups: tuple[KeptGroup, ...] = TRANSFORMER_KEPT) -> KeptGroup | None:
    """The group that keeps `key` in the export dtype, or None when it is quantized."""
    for group in groups:
        if any(fnmatch.fnmatchcase(key, p) for p in group.patterns):
            return group
    return None


def transformer_quantizes(key: str) -> bool:
    """Whether the transformer export quantizes weight `key` (a linear weight outside the kept groups)."""
    return key.endswith(".weight") and kept_group(key) is None


def kept_summary(groups: tuple[KeptGroup, ...] = TRANSFORMER_KEPT) -> dict[str, str]:
    """The policy as the manifest records it: group -> why."""
    return {g.name: f"{', '.join(g.patterns)}: {g.why}" for g in groups}
