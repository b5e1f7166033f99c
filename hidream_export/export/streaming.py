"""Export without holding the model in memory: trace on fake tensors, then stream the weights.

The plain path (`torch.onnx.export` on a loaded model) holds the weights, plus the exporter's copies of
them, at once: users report running out of memory on 12B+ diffusion transformers. Here:

1. the model is built and traced under `FakeTensorMode` (no weight is ever allocated) and converted with
   `optimize=False` (the optimizer's folding would ask fake tensors for values);
2. the onnxscript optimizer then runs on the weightless graph: every initializer is marked value-less,
   so it folds shape arithmetic and removes dead nodes, and leaves weights alone;
3. each remaining initializer gets an external-data slot (offset, length) in `model.onnx.data`, the
   protobuf is written with those references, and the weights are streamed into their slots one tensor at
   a time from the checkpoint (plain file reads, cast to the export dtype on the way).

The transformer does steps 1-3 per part (export/blockwise.py: one block of each kind is traced and the
graph is written block by block), so its graph memory does not grow with depth; the text encoders
(export/encoders.py) are traced whole.

Initializers keep the checkpoint's key names (the exporter names parameters after their state-dict keys),
so the name map the TensorRT refit needs is the identity for checkpoint weights; the few computed tensors
(RoPE tables) are listed with their origin. Peak memory: the traced graph plus one tensor, or one 8 MiB
piece of it where the caller passes TensorPieces (both exports do, for checkpoint weights).

Resumable: the temporary folder carries a progress journal; a rerun with the same settings continues
after the last tensor that was completely written. Nothing in it is ever mistaken for a finished export
(a finished export is a folder renamed into place, with hashes in the manifest).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from hidream_export.files import atomic_open

ALIGN = 64  # byte alignment of every tensor in the data file (mmap/DMA friendly)
JOURNAL = "progress.json"


@dataclass
class Slot:
    name: str
    offset: int
    length: int
    dtype: ir.DataType
    shape: tuple[int, ...]


def weightless_optimize(model: ir.Model) -> list[str]:
    """Run the onnxscript optimizer on a graph whose traced initializers have no values.
    Returns the names of the value-less initializers that survive (the weights to stream)."""
    import logging

    import onnxscript

    for value in model.graph.initializers.values():
        value.const_value = None
    # The deduplication pass logs one warning per value-less initializer (every weight, by design here).
    dedup_log = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    level = dedup_log.level
    dedup_log.setLevel(logging.ERROR)
    try:
        onnxscript.optimizer.optimize(model)
    finally:
        dedup_log.setLevel(level)
    return [name for name, v in model.graph.initializers.items() if v.const_value is None]


def assign_slots(tensors) -> list[Slot]:
    """(name, dtype, shape) in file order -> each tensor's aligned slot in the data file."""
    slots, offset = [], 0
    for name, dtype, shape in tensors:
        shape = tuple(int(d) for d in shape)
        length = int(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)  # itemsize is a float (4-bit types)
        offset = (offset + ALIGN - 1) // ALIGN * ALIGN
        slots.append(Slot(name, offset, length, dtype, shape))
        offset += length
    return slots


def layout(model: ir.Model, names: list[str], data_name: str) -> list[Slot]:
    """Assign each named initializer an aligned slot in `data_name` and point the graph at it."""
    values = [model.graph.initializers[name] for name in names]
    slots = assign_slots((v.name, v.dtype, v.shape) for v in values)
    for value, slot in zip(values, slots):
        value.const_value = ir.ExternalTensor(data_name, slot.offset, slot.length, slot.dtype,
                                              shape=ir.Shape(slot.shape), name=slot.name)
    return slots


@dataclass
class TensorPieces:
    """A tensor given as its shape and its bytes in order, piece by piece (see stream_weights)."""

    shape: tuple[int, ...]
    pieces: "Iterable[bytes | memoryview]"


def data_size(slots: list[Slot]) -> int:
    return max((s.offset + s.length for s in slots), default=0)


def tensor_bytes(tensor) -> memoryview:
    """Raw little-endian bytes of a contiguous torch tensor (bf16 included)."""
    import torch

    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class Progress:
    """Bytes and tensors per second on a terminal; silent when quiet or not a TTY."""

    def __init__(self, total_bytes: int, total_tensors: int, quiet: bool, desc: str):
        self.bar = None
        self.tensors = 0
        self.total_tensors = total_tensors
        self.t0 = time.perf_counter()
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                            file=sys.stderr)

    def update(self, nbytes: int) -> None:
        self.tensors += 1
        if self.bar is not None:
            self.bar.update(nbytes)
            rate = self.tensors / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors, {rate:.0f} tensors/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def stream_weights(data_path: Path, slots: list[Slot], fetch: Callable[[str], "object"], journal: Path,
                   start: int = 0, quiet: bool = True, desc: str = "weights", journal_base: dict | None = None) -> None:
    """Write every slot's tensor into the data file, one at a time; record progress so an interrupted run
    can resume at `start`. `fetch(name)` gives a torch tensor of the slot's dtype and shape, or TensorPieces
    (a large tensor copied without ever being held whole)."""
    total = data_size(slots)
    mode = "r+b" if data_path.exists() else "w+b"
    progress = Progress(sum(s.length for s in slots[start:]), len(slots) - start, quiet, desc)
    try:
        with open(data_path, mode) as fh:
            fh.truncate(total)
            for i in range(start, len(slots)):
                slot = slots[i]
                source = fetch(slot.name)
                if tuple(source.shape) != slot.shape:
                    raise ValueError(f"tensor {slot.name!r} has shape {tuple(source.shape)}, "
                                     f"the graph expects {slot.shape}")
                pieces = source.pieces if isinstance(source, TensorPieces) else (tensor_bytes(source),)
                fh.seek(slot.offset)
                written = 0
                for piece in pieces:
                    written += len(piece)
                    if written > slot.length:
                        break
                    fh.write(piece)
                if written != slot.length:
                    raise ValueError(f"tensor {slot.name!r} has {'more than ' if written > slot.length else ''}"
                                     f"{written} bytes, the graph expects {slot.length}")
                del source, pieces
                progress.update(slot.length)
                if (i + 1) % 32 == 0 or i + 1 == len(slots):
                    fh.flush()
                    os.fsync(fh.fileno())
                    write_journal(journal, {**(journal_base or {}), "done": i + 1, "total": len(slots)})
    finally:
        progress.close()


def write_journal(path: Path, data: dict) -> None:
    """Record progress durably (written, fsynced, renamed): the journal never gets ahead of the data."""
    with atomic_open(path, "w") as fh:
        fh.write(json.dumps(data))


def read_journal(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"done": 0}
    return data if isinstance(data, dict) else {"done": 0}


def resume_point(onnx_path: Path, data_path: Path, journal: Path, key: str) -> tuple[list[Slot] | None, int]:
    """(slots, first tensor to write) for a partial export with the same settings `key` whose files check
    out (the journal's graph loads, has the journal's tensor count, and the data file is there), else
    (None, 0): the export starts over. Nothing is trusted that was not recorded after it was durable."""
    state = read_journal(journal)
    if state.get("key") != key or not state.get("graph_done") or not onnx_path.is_file():
        return None, 0
    try:
        slots = slots_from_saved(onnx_path)
        done = int(state.get("done", 0))
        total = int(state.get("total", -1))
    except Exception:  # noqa: BLE001 - a damaged graph or journal: start over
        return None, 0
    if len(slots) != total or not 0 <= done <= total:
        return None, 0
    if done and (not data_path.is_file() or data_path.stat().st_size != data_size(slots)):
        return None, 0
    return slots, done


def save_graph(model: ir.Model, path: Path) -> None:
    """Write the protobuf only (external tensors stay references; no weight is read)."""
    onnx.save(ir.serde.serialize_model(model), str(path))


def slots_from_saved(path: Path) -> list[Slot]:
    """Recover the slot layout from a saved graph (for resuming)."""
    proto = onnx.load(str(path), load_external_data=False)
    slots = []
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            slots.append(Slot(init.name, int(info.get("offset", 0)), int(info["length"]), ir.DataType(init.data_type),
                              tuple(init.dims)))
    return sorted(slots, key=lambda s: s.offset)
