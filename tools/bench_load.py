#!/usr/bin/env python
"""Peak resident memory of loading a transformer checkpoint, relative to the checkpoint's size.

    python tools/bench_load.py [--preset small] [--dtype bf16] [--workdir DIR]

Each method runs in a fresh process; the figure is peak RSS (ru_maxrss) minus the resident memory after
imports, so it is the loading itself. Methods: `load_transformer` (meta model + plain-read streaming, ours) and, for
contrast, the usual recipe (build the model in memory, safetensors.load_file, load_state_dict).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from pathlib import Path
method, path, dtype = sys.argv[1], Path(sys.argv[2]), getattr(torch, sys.argv[3])
from hidream_export.model import HiDreamTransformer, TransformerConfig
from hidream_export.model.checkpoint import load_transformer
from safetensors.torch import load_file
# Baseline: resident memory now (not ru_maxrss, whose import-time peak can exceed the steady state).
base = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
t0 = time.perf_counter()
if method == "load_transformer":
    model = load_transformer(path, dtype=dtype)
else:
    cfg = TransformerConfig.from_file(path / "transformer" / "config.json")
    model = HiDreamTransformer(cfg).to(dtype)
    state = {}
    for f in sorted((path / "transformer").glob("*.safetensors")):
        state.update(load_file(f))
    model.load_state_dict(state)
    del state
elapsed = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec (the parent's peak would leak in).
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"method": method, "base": base, "peak": peak, "seconds": elapsed}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    import torch

    from hidream_export.testing.checkpoints import write_transformer

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_load_"))
    ckpt = work / f"{args.preset}_{args.dtype}"
    if not (ckpt / "transformer" / "config.json").exists():
        write_transformer(ckpt / "transformer", args.preset, dtype=getattr(torch, args.dtype), shards=2)
    size = sum(f.stat().st_size for f in (ckpt / "transformer").glob("*.safetensors"))
    rows = []
    for method in ("load_transformer", "naive_load_file"):
        out = subprocess.run([sys.executable, "-c", CHILD, method, str(ckpt), args.dtype],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["ratio"] = (r["peak"] - r["base"]) / size
        rows.append(r)
    print(f"checkpoint: preset={args.preset} dtype={args.dtype} size={size / 2**20:.0f} MiB")
    print("| method | peak RSS above baseline / checkpoint bytes | load time (s) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ratio']:.2f} | {r['seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
