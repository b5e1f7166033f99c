"""LoRAs applied to a loaded engine folder at load time, its files untouched.

Each LoRA changes some transformer weights by scale * alpha/rank * (B @ A) (hidream_export.lora). Here
the folder's own weights are memory-mapped from the transformer's ONNX external data, the deltas added
in float32, and the results handed to the backend as replacements for those initializers:

- ONNX Runtime: a new transformer session with `SessionOptions.add_external_initializers`; the text
  encoders and the VAE are not touched. Until the new session is ready the old one keeps serving, so for
  a moment both are in memory.
- TensorRT: the engine is refit in place through the refit name map the build recorded (initializer ->
  engine weight); weights a previous LoRA changed and the new set does not are refit back to the folder's
  values. Needs an engine built refittable (`--refit true`, the default).

The initializers are found through the manifest's initializer_map (ONNX initializer -> checkpoint key).
Every streaming export keeps each checkpoint weight as an initializer of its own, except the `ort`
lowering's routed experts, which live in per-layer stacks (hidream_export/moe/ort_layout.py): a LoRA on an
expert there changes its rows of a copy of the whole stack (w1/w3 de-interleaved from fc1, w2 from fc2),
and the stack is replaced. A weight an export rearranged otherwise (a plain `--no-streaming` export may
fold or stack weights under generated names, e.g. the `plugin` lowering's stacked experts) is refused in
one line saying to fuse the LoRA at build time instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Mapping

import numpy as np

from hidream_export.errors import RequestError
from hidream_export.lora import LoraSet, load_loras
from hidream_export.manifest import LoraRecord, Manifest, TrtEngineComponent, TransformerComponent
from hidream_export.moe.ort_layout import ExpertRows, fused_weight
from hidream_export.runtime.weights import Initializer, initializer_value, read_initializers

__all__ = ["AppliedLoras", "FolderWeights", "LoraUpdate", "engine_refit_weights", "resolve"]


@dataclass(frozen=True)
class AppliedLoras:
    """The LoRAs a Pipeline's transformer runs with (none by default), and which initializers they replaced."""

    records: tuple[LoraRecord, ...] = ()
    identity: tuple[tuple[str, float], ...] = ()  # (sha256, scale) in order: equal identities, equal weights
    replaced: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LoraUpdate:
    """What switching to a set of LoRAs takes: the new values of the initializers it changes, and the
    folder's own values of those a previous set changed and this one does not (for an in-place refit)."""

    applied: AppliedLoras
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    restore: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class FolderWeights:
    """The transformer weights of an engine folder by checkpoint key: which initializer holds each."""

    folder: Path
    manifest: Manifest
    entry: TransformerComponent
    initializers: dict[str, Initializer]  # by initializer name
    by_key: dict[str, str]  # checkpoint key -> initializer name
    stacked: dict[str, ExpertRows] = field(default_factory=dict)  # checkpoint key -> its rows in an `ort` stack

    @classmethod
    def of(cls, folder: str | Path, manifest: Manifest) -> "FolderWeights":
        folder = Path(folder)
        entry = manifest.component("transformer", TransformerComponent, folder)
        initializers = read_initializers(manifest.file_path(folder, "transformer"))
        by_key = {key: name for name, key in entry.initializer_map.items()
                  if name in initializers and not key.startswith("computed:")}
        stacked = {}
        for name, key in entry.initializer_map.items():
            shape = initializers[name].shape if name in initializers else ()
            # the stack's own expert count, so each key's place is always inside it
            fused = fused_weight(name, shape[0]) if key == f"computed:{name}" and len(shape) == 3 else None
            if entry.moe_lowering == "ort" and fused is not None:
                stacked.update(fused.rows())
        return cls(folder, manifest, entry, initializers, by_key, stacked)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of checkpoint weight `key` as this folder holds it."""
        if key in self.by_key:
            return self.initializers[self.by_key[key]].shape
        rows = self.stacked[key]
        _, height, cols = self.initializers[rows.name].shape
        return (height // rows.parts, cols)

    def holder(self, key: str) -> str:
        """The initializer that holds checkpoint weight `key`."""
        return self.by_key[key] if key in self.by_key else self.stacked[key].name

    def check(self, lora_set: LoraSet) -> None:
        """Refuse, in one line, LoRAs this folder's transformer cannot take at load time."""
        model = f"the transformer of {self.folder}"
        absent = [k for k in lora_set.keys if k not in self.by_key and k not in self.stacked]
        # A streaming export writes every checkpoint weight as an initializer of the same name (the export
        # checks it) or into an `ort` expert stack; one that renames any otherwise (a plain export's folded or
        # stacked weights) cannot tell a weight it rearranged from one the model lacks.
        stacks = {rows.name for rows in self.stacked.values()}
        keeps_names = self.entry.streaming and all(
            name == key or name.startswith("rope.") or name in stacks
            for name, key in self.entry.initializer_map.items())
        if absent and not keeps_names:
            shown = ", ".join(k.removesuffix(".weight") for k in absent[:3]) + (" ..." if len(absent) > 3 else "")
            raise RequestError(f"{self.folder}: its export has no initializer named after {len(absent)} LoRA module "
                               f"weight(s) ({shown}): weights it folded or rearranged (a --no-streaming export's "
                               f"folded weights or stacked experts) or not layers of this transformer; fuse the LoRA at "
                               f"build time instead (build/export --lora FILE)")
        lora_set.check({k: self.shape(k) for k in [*self.by_key, *self.stacked]}, model)
        inline = [k for k in lora_set.keys if self.initializers[self.holder(k)].location is None]
        if inline:
            raise RequestError(f"{self.folder}: the transformer keeps {', '.join(inline[:3])} inside its graph, where "
                               f"onnxruntime cannot replace it; fuse the LoRA at build time instead (--lora FILE)")

    def value(self, name: str) -> np.ndarray:
        """The folder's own value of initializer `name` (memory-mapped, read-only)."""
        init = self.initializers[name]
        rel = str(PurePosixPath(self.entry.path).parent / init.location)
        return initializer_value(self.manifest.file_path(self.folder, "transformer", rel), init)

    def overrides(self, lora_set: LoraSet) -> dict[str, np.ndarray]:
        """initializer name -> the folder's weight + the LoRAs' delta, in the weight's dtype. An `ort` expert
        stack is copied whole (onnxruntime replaces whole initializers) and each adapted expert's rows are
        changed in the copy."""
        out = {}
        for key in lora_set.keys:
            if key in self.by_key:
                out[self.by_key[key]] = lora_set.fused(key, self.value(self.by_key[key]))
                continue
            rows = self.stacked[key]
            if rows.name not in out:
                out[rows.name] = np.array(self.value(rows.name))
            view = out[rows.name][rows.expert, rows.part::rows.parts]
            view[...] = lora_set.fused(key, view)
        return out


def resolve(folder: str | Path, manifest: Manifest, requests: Iterable, current: AppliedLoras = AppliedLoras()
            ) -> LoraUpdate | None:
    """Read and check the requested LoRAs (paths, (path, scale) pairs or LoraRequests) against the folder;
    None when they are the set `current` already runs (same files by content, same scales, same order)."""
    lora_set = load_loras(requests)
    identity = tuple((d["sha256"], d["scale"]) for d in lora_set.identity())
    if identity == current.identity:
        return None
    weights = FolderWeights.of(folder, manifest)
    weights.check(lora_set)
    values = weights.overrides(lora_set)
    restore = {name: np.ascontiguousarray(weights.value(name)) for name in sorted(current.replaced - set(values))}
    applied = AppliedLoras(tuple(lora_set.records()), identity, frozenset(values))
    return LoraUpdate(applied, values, restore)


def engine_refit_weights(entry: TrtEngineComponent, values: Mapping[str, np.ndarray], where: str = ""
                         ) -> dict[str, np.ndarray]:
    """The TensorRT engine weights to refit for these initializer values: through the build's refit name
    map (initializer -> engine weight name). Refuses, in one line, an engine that is not refittable, or
    initializers it has no refittable weight for (folded into the engine at build time)."""
    where = where or entry.path
    refit = entry.refit or {}
    mode = entry.flags.get("refit")
    name_map = refit.get("name_map")
    if mode is not True or not isinstance(name_map, dict):
        raise RequestError(f"{where}: this TensorRT engine is not refittable (built with --refit {str(mode).lower()}); "
                           f"rebuild it with --refit true to apply LoRAs at load time, or fuse them at build time "
                           f"(--lora FILE)")
    frozen = set(refit.get("not_refittable") or ())
    unknown = [n for n in values if n not in name_map or n in frozen]
    if unknown:
        raise RequestError(f"{where}: the engine has no refittable weight for initializer(s) {', '.join(unknown[:3])}"
                           f"{' ...' if len(unknown) > 3 else ''} (folded at build time); fuse the LoRA at build time "
                           f"instead (--lora FILE)")
    return {name_map[n]: np.ascontiguousarray(v) for n, v in values.items()}
