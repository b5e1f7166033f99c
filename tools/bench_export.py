#!/usr/bin/env python
"""Export cost and ONNX Runtime speed for the `small` preset, all measured side by side in one run.

    python tools/bench_export.py [--workdir DIR] [--repeats 3] [--threads 2]
    python tools/bench_export.py --scaling [--workdir DIR]      # streaming vs plain, small vs large
    python tools/bench_export.py --real [--workdir DIR]         # 17B synthetic checkpoint, streaming only

1. Export wall time and peak RSS per MoE lowering (each export in a fresh process).
2. One transformer forward at 512x512 (batch 1, Dev recipe): ONNX Runtime CPU per lowering vs PyTorch
   eager running diffusers' own HiDreamImageTransformer2DModel (its `moe_infer`) with the same weights.
3. The MoE layer alone (1409 tokens = a single-stream block's sequence at 512x512): gather vs dense.
4. (--scaling) peak RSS and wall time of exporting `small` and `large` (10x) bf16 checkpoints through the
   streaming path and the plain path; (--real) the same for a synthetic checkpoint in the real 17.1B
   layout (7 shards, bf16, ~34 GB), streaming only.

Times are medians of --repeats runs after one warm-up; ratios are what to read (machine noise ~15%).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXPORT_CHILD = r"""
import json, sys, time
from hidream_export.export.transformer import export_transformer
streaming = sys.argv[4] == "streaming" if len(sys.argv) > 4 else True
dtype = sys.argv[5] if len(sys.argv) > 5 else "fp32"
t0 = time.perf_counter()
export_transformer(sys.argv[1], "dev", sys.argv[2], moe=sys.argv[3], force=True, streaming=streaming, dtype=dtype)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak.
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": hwm}))
"""


def run_export(ckpt, out, lowering, path="streaming", dtype="fp32") -> dict:
    out_proc = subprocess.run([sys.executable, "-c", EXPORT_CHILD, str(ckpt), str(out), lowering, path, dtype],
                              capture_output=True, text=True)
    if out_proc.returncode:
        return {"error": out_proc.stderr.strip().splitlines()[-1] if out_proc.stderr.strip() else "failed"}
    return json.loads(out_proc.stdout.strip().splitlines()[-1])


def scaling(work: Path, presets: list[str], paths: list[str], lowering: str = "dense") -> None:
    import math

    import torch

    from hidream_export.model import PRESETS
    from hidream_export.model.checkpoint import expected_shapes
    from hidream_export.testing.checkpoints import write_transformer

    print(f"## export scaling ({lowering} lowering, bf16 checkpoints and exports)\n")
    print("| preset | parameters | checkpoint | largest tensor | path | peak RSS | peak RSS / checkpoint | wall time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    peaks: dict[str, dict[str, tuple[int, int]]] = {}  # path -> preset -> (peak RSS, largest tensor)
    for preset in presets:
        cfg = PRESETS[preset]
        ckpt = work / f"{preset}_bf16"
        if not (ckpt / "transformer" / "config.json").exists():
            write_transformer(ckpt / "transformer", preset, dtype=torch.bfloat16,
                              shards=7 if preset == "real" else 2)
        size = sum(f.stat().st_size for f in (ckpt / "transformer").glob("*.safetensors"))
        largest = max(math.prod(s) for s in expected_shapes(cfg).values()) * 2
        for path in paths:
            r = run_export(ckpt, work / f"out_{preset}_{path}", lowering, path, "bf16")
            if "error" in r:
                print(f"| {preset} | | | | {path} | failed: {r['error'][:80]} | | |")
                continue
            print(f"| {preset} | {cfg.parameter_counts()['total'] / 1e9:.2f} B | {size / 2**30:.2f} GiB | "
                  f"{largest / 2**20:.0f} MiB | {path} | {r['peak_rss'] / 2**30:.2f} GiB ({r['peak_rss'] / 2**20:.0f} MiB) | "
                  f"{r['peak_rss'] / size:.2f} | {r['seconds']:.0f} |", flush=True)
            peaks.setdefault(path, {})[preset] = (r["peak_rss"], largest)
            import shutil

            shutil.rmtree(work / f"out_{preset}_{path}", ignore_errors=True)
    print()
    for path, by_preset in peaks.items():
        if len(by_preset) < 2:
            continue
        (a, (peak_a, _)), (b, (peak_b, largest_b)) = list(by_preset.items())[:2]
        grown = peak_b - peak_a
        verdict = "under" if grown < largest_b else "NOT under"
        print(f"{path}: peak RSS {a} -> {b} grew {grown / 2**20:+.0f} MiB, {verdict} the largest tensor "
              f"({largest_b / 2**20:.0f} MiB)")


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lowerings", nargs="+", default=["gather", "dense", "plugin"])
    p.add_argument("--scaling", action="store_true", help="streaming vs plain export, small vs large preset")
    p.add_argument("--real", action="store_true", help="streaming export of a synthetic real-layout checkpoint")
    args = p.parse_args(argv)
    if args.scaling or args.real:
        work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_export_"))
        if args.scaling:
            scaling(work, ["small", "large"], ["streaming", "plain"])
        if args.real:
            scaling(work, ["real"], ["streaming"])
        return 0

    import onnxruntime as ort
    import torch

    from hidream_export.compare.parity import random_feed
    from hidream_export.testing.checkpoints import write_transformer

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_export_"))
    ckpt = work / "small"
    if not (ckpt / "transformer" / "config.json").exists():
        write_transformer(ckpt / "transformer", "small", dtype=torch.float32)
    size = sum(f.stat().st_size for f in (ckpt / "transformer").glob("*.safetensors"))

    print(f"## small preset ({size / 2**20:.0f} MiB fp32), {args.threads} threads\n")
    print("| lowering | export wall time (s) | export peak RSS (GiB) | peak RSS / checkpoint |")
    print("|---|---|---|---|")
    for lowering in args.lowerings:
        r = run_export(ckpt, work / f"onnx_{lowering}", lowering)
        if "error" in r:
            print(r["error"], file=sys.stderr)
            return 1
        print(f"| {lowering} | {r['seconds']:.1f} | {r['peak_rss'] / 2**30:.2f} | {r['peak_rss'] / size:.2f} |")

    # ---- one forward at 512x512 -----------------------------------------------------------------
    import diffusers

    from hidream_export.model.checkpoint import load_transformer

    ours = load_transformer(ckpt, dtype=torch.float32)
    cfg = ours.config
    ref = diffusers.HiDreamImageTransformer2DModel(
        **{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}).eval()
    ref.load_state_dict(ours.state_dict())
    from hidream_export.manifest import Manifest

    entry = Manifest.read(work / f"onnx_{args.lowerings[0]}").transformer
    feed = random_feed(entry, 512, 512, 1, 0)
    targs = [torch.from_numpy(feed[n]) for n in ("hidden_states", "timesteps", "encoder_hidden_states_t5",
                                                  "encoder_hidden_states_llama3", "pooled_embeds")]
    rows = []
    with torch.no_grad():
        t_diffusers = median_time(lambda: ref(*targs, return_dict=False), args.repeats)
        rows.append(("PyTorch eager, diffusers (moe_infer)", t_diffusers))
        rows.append(("PyTorch eager, ours (reference lowering)", median_time(lambda: ours(*targs), args.repeats)))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    for lowering in args.lowerings:
        sess = ort.InferenceSession(str(work / f"onnx_{lowering}" / "transformer" / "model.onnx"), opts)
        rows.append((f"ONNX Runtime CPU, {lowering}", median_time(lambda: sess.run(None, feed), args.repeats)))
    print("\n## one transformer forward, 512x512, batch 1\n")
    print("| runner | seconds | / diffusers eager |")
    print("|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.3f} | {t / t_diffusers:.2f} |")

    # ---- the MoE layer alone ------------------------------------------------------------------------
    from hidream_export.model.moe import MoEFeedForward

    tokens = 1024 + 1 + 384
    x = torch.randn(1, tokens, cfg.inner_dim)
    layer_times = {}
    for lowering in ("gather", "dense"):
        moe = MoEFeedForward(cfg.inner_dim, cfg.expert_hidden_dim, cfg.shared_expert_hidden_dim,
                             cfg.num_routed_experts, cfg.num_activated_experts, lowering).eval()
        moe.load_state_dict(ours.single_stream_blocks[0].block.ff_i.state_dict())
        path = work / f"moe_{lowering}.onnx"
        torch.onnx.export(moe, (x,), dynamo=True,
                          dynamic_shapes=({1: torch.export.Dim("t", min=2, max=8192)},)).save(path)
        sess = ort.InferenceSession(str(path), opts)
        name = sess.get_inputs()[0].name
        layer_times[lowering] = median_time(lambda: sess.run(None, {name: x.numpy()}), args.repeats)
    print(f"\n## MoE layer alone, {tokens} tokens, ONNX Runtime CPU\n")
    print("| lowering | seconds | / dense |")
    print("|---|---|---|")
    for lowering, t in layer_times.items():
        print(f"| {lowering} | {t:.4f} | {t / layer_times['dense']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
