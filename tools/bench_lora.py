#!/usr/bin/env python
"""What LoRAs cost: switching them on a loaded Pipeline against a cold load, and fusing one while streaming.

    python tools/bench_lora.py [--preset small] [--variant fast] [--rank 16] [--repeats 3] [--threads 2]
                               [--workdir DIR] [--model DIR] [--engines DIR]
    python tools/bench_lora.py --export-rss CHECKPOINT [--config real] [--dtype bf16] [--moe dense] [--workdir DIR]
    python tools/bench_lora.py --export-rss DIR --sparse real      # writes DIR as a zero-weight sparse checkpoint

1. (default) On a `--preset` engine folder (built as tools/bench_runtime.py builds it; `--engines` reuses
   one), in one process, medians of --repeats rounds (each round runs every step once, so a busy machine
   slows every row alike): a cold `Pipeline.from_dir` without and with a LoRA, then
   `set_loras` from one LoRA to another, to none, and to the set already applied, and, for scale, the
   transformer session alone. LoRA A adapts every attention projection; LoRA B every attention projection
   and every MoE expert and shared expert, rank --rank.
2. (--export-rss) Peak RSS (VmHWM) of a streaming export of CHECKPOINT without and with a build-time LoRA on
   every attention projection, each in a fresh process, side by side in one run. The output is deleted
   after each export (the real layout's is ~34 GB). `--sparse PRESET` first writes CHECKPOINT as that
   preset's layout with every weight zero, stored as file holes: the export reads it like any checkpoint
   (plain reads, so its memory is the same), but it takes no disk, which leaves room for the output on a
   machine without 66 GB free.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

EXPORT_CHILD = r"""
import json, sys, time
from hidream_export.export.transformer import export_transformer
ckpt, out, moe, dtype, config = sys.argv[1:6]
loras = [(p, 1.0) for p in sys.argv[6:]]
t0 = time.perf_counter()
export_transformer(ckpt, "dev", out, moe=moe, dtype=dtype, config=None if config == "-" else config, loras=loras,
                   force=True)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak.
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": hwm}))
"""


def write_loras(config, work: Path, rank: int) -> dict[str, Path]:
    from hidream_export.model.checkpoint import expected_shapes
    from hidream_export.testing.loras import attention_modules, random_factors, write_lora

    attention = attention_modules(config)
    ffn = sorted(k.removesuffix(".weight") for k in expected_shapes(config)
                 if (".ff_i.experts." in k or ".ff_i.shared_experts." in k) and k.endswith(".weight"))
    return {"A (attention)": write_lora(work / f"lora_a_r{rank}.safetensors",
                                        random_factors(config, attention, rank, seed=1), "diffusers"),
            "B (attention + experts)": write_lora(work / f"lora_b_r{rank}.safetensors",
                                                  random_factors(config, attention + ffn, rank, seed=2), "diffusers")}


def bench_switch(args) -> None:
    from bench_runtime import prepare

    from hidream_export.lora import LoraFile
    from hidream_export.manifest import Manifest
    from hidream_export.runtime import Pipeline
    from hidream_export.runtime.lora import resolve

    model, engines, took = prepare(args)
    manifest = Manifest.read(engines)
    work = Path(args.workdir or engines.parent)
    loras = write_loras(manifest.transformer.config, work, args.rank)
    a, b = ([(p, 0.8)] for p in loras.values())
    sizes = {name: len(LoraFile.read(p).modules) for name, p in loras.items()}

    def load(**kw):
        return Pipeline.from_dir(engines, threads=args.threads, progress=False, verify=False, **kw)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    pipe = load(loras=a)  # also warms the page cache, so every row reads from memory alike
    backend, key = pipe.backend, "transformer"
    steps = {
        "cold load, no LoRA": load,
        "cold load with LoRA A": lambda: load(loras=a),
        "transformer session alone (no LoRA)": lambda: backend.load(manifest.file_path(engines, key),
                                                                    manifest.components[key]),
        "LoRA B's new weights (read + deltas)": lambda: resolve(engines, manifest, b),
        "set_loras A -> B": lambda: pipe.set_loras(b),
        "set_loras B -> none": lambda: pipe.set_loras([]),
        "set_loras none -> A": lambda: pipe.set_loras(a),
        "set_loras A -> A (already applied)": lambda: pipe.set_loras(a),
    }
    # Interleaved, one of each per round, so a busy machine slows every row alike.
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(args.repeats):
        for label, fn in steps.items():
            times[label].append(timed(fn))
    rows = {label: statistics.median(t) for label, t in times.items()}
    cold = rows["cold load, no LoRA"]
    print(f"engine folder: {engines} (preset {args.preset}, {args.variant}); LoRAs rank {args.rank}: "
          + ", ".join(f"{k} {n} modules" for k, n in sizes.items()) + f"; {pipe.backend.describe()}; "
          f"medians of {args.repeats}" + (f"; prepared in {json.dumps(took)}" if took else ""))
    print("| step | seconds | / cold load |")
    print("|---|---|---|")
    for label, seconds in rows.items():
        print(f"| {label} | {seconds:.3f} | {seconds / cold:.2f} |")


def write_sparse_checkpoint(folder: Path, preset: str, dtype: str = "BF16", shards: int = 7) -> Path:
    """`folder`/transformer as a diffusers checkpoint of `preset` whose weights are all zero and not on
    disk: each shard is a safetensors header followed by a hole as long as its data."""
    import math
    import struct

    from hidream_export.model.checkpoint import CONFIG_NAME, INDEX_NAME, expected_shapes
    from hidream_export.model.config import resolve_config

    config = resolve_config(preset)
    itemsize = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    sizes = {k: math.prod(shape) * itemsize for k, shape in expected_shapes(config).items()}
    shapes = expected_shapes(config)
    total, start, groups = sum(sizes.values()), 0, [[] for _ in range(shards)]
    for key, size in sizes.items():
        groups[min(shards - 1, start * shards // total)].append(key)
        start += size
    out = folder / "transformer"
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for key in keys:
            header[key] = {"dtype": dtype, "shape": list(shapes[key]), "data_offsets": [offset, offset + sizes[key]]}
            offset += sizes[key]
            weight_map[key] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / name, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + offset)
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / CONFIG_NAME).write_text(json.dumps(config.to_dict()))
    return folder


def bench_export_rss(args) -> None:
    from hidream_export.model.checkpoint import locate_checkpoint

    if args.sparse and not Path(args.export_rss).exists():
        write_sparse_checkpoint(Path(args.export_rss), args.sparse)

    ckpt = locate_checkpoint(args.export_rss, args.config)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_lora_"))
    work.mkdir(parents=True, exist_ok=True)
    lora = write_loras(ckpt.config, work, args.rank)["A (attention)"]
    rows = []
    for label, extra in (("no LoRA", []), (f"LoRA on every attention projection (rank {args.rank})", [str(lora)])):
        out = work / "export"
        proc = subprocess.run([sys.executable, "-c", EXPORT_CHILD, str(args.export_rss), str(out), args.moe, args.dtype,
                               args.config or "-", *extra], capture_output=True, text=True, cwd=REPO)
        shutil.rmtree(out, ignore_errors=True)
        if proc.returncode:
            raise SystemExit(f"export failed ({label}): {proc.stderr.strip().splitlines()[-1:]}")
        rows.append((label, json.loads(proc.stdout.strip().splitlines()[-1])))
    base = rows[0][1]["peak_rss"]
    print(f"checkpoint {args.export_rss}: {ckpt.nbytes / 2**30:.2f} GiB, {len(ckpt.entries)} tensors; export "
          f"{args.dtype}, moe {args.moe}, streaming; LoRA file {lora.stat().st_size / 2**20:.1f} MiB")
    print("| export | peak RSS (MiB) | / without LoRA | wall time (s) |")
    print("|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['peak_rss'] / 2**20:.0f} | {r['peak_rss'] / base:.3f} | {r['seconds']:.0f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="fast", choices=["full", "dev", "fast"])
    p.add_argument("--preset", default="small")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--model", default=None, help="existing model folder (skips write_model_folder)")
    p.add_argument("--engines", default=None, help="existing engine folder (skips the build)")
    p.add_argument("--export-rss", default=None, metavar="CHECKPOINT",
                   help="measure a streaming export of this checkpoint with and without a build-time LoRA")
    p.add_argument("--config", default=None, help="with --export-rss: preset or config.json (single-file checkpoints)")
    p.add_argument("--sparse", default=None, metavar="PRESET",
                   help="with --export-rss: write CHECKPOINT first as a zero-weight sparse checkpoint of PRESET")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--moe", default="dense")
    args = p.parse_args(argv)
    if args.export_rss:
        bench_export_rss(args)
    else:
        bench_switch(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
