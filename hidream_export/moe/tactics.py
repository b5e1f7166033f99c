"""The custom tactics the HiDreamMoE TensorRT plugin advertises: tile configurations of the JIT pipeline
(kernels.py) and of the single-launch AOT kernel (aot_kernel.py), under one set of ids. Plain Python."""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Tactic:
    """A custom tactic TensorRT times during the build (ids must be positive integers).

    `tile`: MoETileConfig keyword arguments for the JIT pipeline (None: `kernels.default_config`, which
    re-picks tiles from each call's token count, the right choice when one engine serves many sizes), or
    the block sizes of the single-launch AOT kernel."""

    id: int
    name: str
    tile: dict | None


JIT_TACTICS: tuple[Tactic, ...] = (
    Tactic(1, "heuristic", None),
    Tactic(2, "m16n64k64", {"block_m": 16, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 3}),
    Tactic(3, "m64n128k32", {"block_m": 64, "block_n": 128, "block_k": 32, "num_warps": 8, "num_stages": 3}),
    Tactic(4, "m128n128k32", {"block_m": 128, "block_n": 128, "block_k": 32, "num_warps": 8, "num_stages": 3}),
)
# Single-launch kernel: BLOCK_N output columns per program (larger = fewer gate/up recomputations),
# BLOCK_I intermediate columns per step. Kept small enough for <= 48 KiB of shared memory (checked by
# compile_aot_kernel), because nothing says the AOT launcher raises the dynamic shared-memory limit.
AOT_TACTICS: tuple[Tactic, ...] = (
    Tactic(1, "rows32_n128", {"block_m": 32, "block_n": 128, "block_i": 64, "block_k": 32, "num_warps": 4, "num_stages": 2}),
    Tactic(2, "rows64_n128", {"block_m": 64, "block_n": 128, "block_i": 32, "block_k": 32, "num_warps": 8, "num_stages": 2}),
    Tactic(3, "rows16_n256", {"block_m": 16, "block_n": 256, "block_i": 32, "block_k": 32, "num_warps": 4, "num_stages": 2}),
    Tactic(4, "rows64_n64", {"block_m": 64, "block_n": 64, "block_i": 64, "block_k": 32, "num_warps": 4, "num_stages": 2}),
)
TACTIC_IDS = tuple(t.id for t in JIT_TACTICS)
assert TACTIC_IDS == tuple(t.id for t in AOT_TACTICS), "JIT and AOT advertise the same tactic ids"


def find_tactic(table: Sequence[Tactic], tactic: int) -> Tactic:
    for t in table:
        if t.id == int(tactic):
            return t
    # Tactic 0 is TensorRT's "default"; it is passed when no custom tactic was timed (e.g. autotune absent).
    return table[0]

