#!/usr/bin/env python
"""Export cost and ONNX Runtime speed for the `small` preset, all measured side by side in one run.

    python tools/bench_export.py [--workdir DIR] [--repeats 3] [--threads 2] [--graphs gather ort ...] [--profile]
    python tools/bench_export.py --scaling [--workdir DIR]      # streaming vs plain, small vs large
    python tools/bench_export.py --real [--workdir DIR]         # 17B synthetic checkpoint, streaming only

1. Export wall time and peak RSS per graph (each export in a fresh process). A graph is a MoE lowering,
   optionally `@target` (`gather@onnxruntime`: the gather lowering in the onnxruntime target's fused graph).
2. One transformer forward at 512x512 (batch 1, Dev recipe): ONNX Runtime CPU per graph vs PyTorch
   eager running diffusers' own HiDreamImageTransformer2DModel (its `moe_infer`) with the same weights.
   The runners take turns, one forward each per round, so machine load falls on all of them alike.
   Each runner's GFLOP/s is the forward's FLOPs (counted by torch.utils.flop_counter on the model with
   the `gather` lowering, i.e. the routed FLOPs, and math attention so both attention matmuls count)
   over its time, and is given as a fraction of this CPU's fp32 matmul ceiling: a 4096^3 matmul in
   PyTorch on the same threads. --profile adds ONNX Runtime's own profile of each graph (time by op).
3. The MoE layer alone (1409 tokens = a single-stream block's sequence at 512x512): gather, dense and ort.
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
moe, _, target = sys.argv[3].partition("@")
t0 = time.perf_counter()
export_transformer(sys.argv[1], "dev", sys.argv[2], moe=moe, target=target or None, force=True, streaming=streaming,
                   dtype=dtype)
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
    return median_times({"": fn}, repeats)[""]


def median_times(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable over `repeats` rounds after one warm-up round; in every round each
    callable runs once, in turn, so a change in machine load falls on all of them alike."""
    times = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_ceiling_runners(threads: int, n: int = 4096):
    """({name: callable}, FLOPs) of an n^3 fp32 matmul in PyTorch (the ceiling the issue names) and in ONNX
    Runtime (MLAS, whose GEMM may be faster than PyTorch's BLAS on a given CPU). Timed in the same rounds
    as the runners, so they meet the same machine load."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    a, b = torch.randn(n, n), torch.randn(n, n)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
                                .SerializeToString(), opts)
    feed = {"a": a.numpy(), "b": np.ascontiguousarray(b.numpy())}
    return {"matmul ceiling, PyTorch": lambda: a @ b,
            "matmul ceiling, ONNX Runtime": lambda: sess.run(None, feed)}, 2 * n**3


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else the platform's machine name."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def forward_flops(model, args) -> int:
    """FLOPs of one forward: the `gather` lowering runs each expert on its own tokens only (the routed
    FLOPs), and the math attention kernel exposes its two matmuls to the counter."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    lowering = model.moe_lowering
    model.set_moe_lowering("gather")
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(*args)
    finally:
        model.set_moe_lowering(lowering)
    return counter.get_total_flops()


def ort_profile(path: Path, feed: dict, threads: int, top: int = 8) -> list[tuple[str, float]]:
    """ONNX Runtime's own profile of two forwards: (op type, share of kernel time), largest first."""
    import collections
    import os

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.parent / "ort_profile")
    sess = ort.InferenceSession(str(path), opts)
    for _ in range(2):
        sess.run(None, feed)
    profile = sess.end_profiling()
    with open(profile) as fh:
        events = json.load(fh)
    os.remove(profile)
    by_op: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    total = sum(by_op.values()) or 1
    return [(op, t / total) for op, t in by_op.most_common(top)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--graphs", "--lowerings", nargs="+", dest="graphs",
                   default=["gather", "dense", "plugin", "gather@onnxruntime", "ort"],
                   help="MoE lowerings to export and time, each optionally @target (gather@onnxruntime)")
    p.add_argument("--profile", action="store_true", help="print ONNX Runtime's profile of each graph (time by op)")
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

    print(f"## small preset ({size / 2**20:.0f} MiB fp32), {args.threads} threads, {_cpu_name()}, "
          f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, onnxruntime {ort.__version__}\n")
    print("| graph | export wall time (s) | export peak RSS (GiB) | peak RSS / checkpoint |")
    print("|---|---|---|---|")
    folders = {}
    for graph in args.graphs:
        folders[graph] = work / f"onnx_{graph.replace('@', '_')}"
        r = run_export(ckpt, folders[graph], graph)
        if "error" in r:
            print(r["error"], file=sys.stderr)
            return 1
        print(f"| {graph} | {r['seconds']:.1f} | {r['peak_rss'] / 2**30:.2f} | {r['peak_rss'] / size:.2f} |",
              flush=True)

    # ---- one forward at 512x512 -----------------------------------------------------------------
    import diffusers

    from hidream_export.manifest import Manifest
    from hidream_export.model.checkpoint import load_transformer

    ours = load_transformer(ckpt, dtype=torch.float32)
    cfg = ours.config
    ref = diffusers.HiDreamImageTransformer2DModel(
        **{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}).eval()
    ref.load_state_dict(ours.state_dict())
    entry = Manifest.read(folders[args.graphs[0]]).transformer
    feed = random_feed(entry, 512, 512, 1, 0)
    targs = [torch.from_numpy(feed[n]) for n in ("hidden_states", "timesteps", "encoder_hidden_states_t5",
                                                  "encoder_hidden_states_llama3", "pooled_embeds")]
    flops = forward_flops(ours, targs)
    ceilings, matmul_flops = matmul_ceiling_runners(args.threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    runners = {"PyTorch eager, diffusers (moe_infer)": lambda: ref(*targs, return_dict=False),
               "PyTorch eager, ours (reference lowering)": lambda: ours(*targs)}
    for graph in args.graphs:
        sess = ort.InferenceSession(str(folders[graph] / "transformer" / "model.onnx"), opts)
        runners[f"ONNX Runtime CPU, {graph}"] = lambda sess=sess: sess.run(None, feed)
    runners.update(ceilings)
    with torch.no_grad():
        times = median_times(runners, args.repeats)
    ceiling, mlas = (matmul_flops / times.pop(name) / 1e9 for name in ceilings)
    t_diffusers = times["PyTorch eager, diffusers (moe_infer)"]
    print(f"\n## one transformer forward, 512x512, batch 1: {flops / 1e9:.1f} GFLOP; fp32 matmul ceiling "
          f"{ceiling:.0f} GFLOP/s (4096^3 in PyTorch; ONNX Runtime's MatMul: {mlas:.0f} GFLOP/s), {args.threads} "
          f"threads, medians of the same rounds\n")
    print("| runner | seconds | / diffusers eager | GFLOP/s | of the matmul ceiling | of ONNX Runtime's matmul |")
    print("|---|---|---|---|---|---|")
    for name, t in times.items():
        rate = flops / t / 1e9
        print(f"| {name} | {t:.3f} | {t / t_diffusers:.2f} | {rate:.0f} | {rate / ceiling:.0%} | {rate / mlas:.0%} |")
    if args.profile:
        print("\n## ONNX Runtime profile, share of kernel time by op type\n")
        for graph in args.graphs:
            shares = ort_profile(folders[graph] / "transformer" / "model.onnx", feed, args.threads)
            print(f"- {graph}: " + ", ".join(f"{op} {share:.0%}" for op, share in shares))

    # ---- the MoE layer alone ------------------------------------------------------------------------
    from hidream_export.model.moe import MoEFeedForward
    from hidream_export.moe import ort_moe

    tokens = 1024 + 1 + 384
    x = torch.randn(1, tokens, cfg.inner_dim)
    layer_runners = {}
    for lowering in ("gather", "dense", "ort"):
        moe = MoEFeedForward(cfg.inner_dim, cfg.expert_hidden_dim, cfg.shared_expert_hidden_dim,
                             cfg.num_routed_experts, cfg.num_activated_experts, lowering).eval()
        moe.load_state_dict(ours.single_stream_blocks[0].block.ff_i.state_dict())
        path = work / f"moe_{lowering}.onnx"
        table = ort_moe.translation_table() if lowering == "ort" else None
        torch.onnx.export(moe, (x,), dynamo=True, custom_translation_table=table,
                          dynamic_shapes=({1: torch.export.Dim("t", min=2, max=8192)},)).save(path)
        sess = ort.InferenceSession(str(path), opts)
        name = sess.get_inputs()[0].name
        layer_runners[lowering] = lambda sess=sess, name=name: sess.run(None, {name: x.numpy()})
    layer_times = median_times(layer_runners, args.repeats)
    print(f"\n## MoE layer alone, {tokens} tokens, ONNX Runtime CPU\n")
    print("| lowering | seconds | / dense |")
    print("|---|---|---|")
    for lowering, t in layer_times.items():
        print(f"| {lowering} | {t:.4f} | {t / layer_times['dense']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
