#!/usr/bin/env python
"""Export cost and ONNX Runtime speed for the `small` preset, all measured side by side in one run.

    python tools/bench_export.py [--workdir DIR] [--repeats 3] [--threads 2]

1. Export wall time and peak RSS per MoE lowering (each export in a fresh process).
2. One transformer forward at 512x512 (batch 1, Dev recipe): ONNX Runtime CPU per lowering vs PyTorch
   eager running diffusers' own HiDreamImageTransformer2DModel (its `moe_infer`) with the same weights.
3. The MoE layer alone (1409 tokens = a single-stream block's sequence at 512x512): gather vs dense.

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
import json, resource, sys, time
from hidream_export.export.transformer import export_transformer
t0 = time.perf_counter()
export_transformer(sys.argv[1], "dev", sys.argv[2], moe=sys.argv[3], force=True)
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


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
    args = p.parse_args(argv)

    import numpy as np
    import onnxruntime as ort
    import torch

    from hidream_export.compare.parity import random_feed
    from hidream_export.tiny import write_transformer

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
        out = subprocess.run([sys.executable, "-c", EXPORT_CHILD, str(ckpt), str(work / f"onnx_{lowering}"), lowering],
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {lowering} | {r['seconds']:.1f} | {r['peak_rss'] / 2**30:.2f} | {r['peak_rss'] / size:.2f} |")

    # ---- one forward at 512x512 -----------------------------------------------------------------
    import diffusers

    from hidream_export.model.checkpoint import load_transformer

    ours = load_transformer(ckpt, dtype=torch.float32)
    cfg = ours.config
    ref = diffusers.HiDreamImageTransformer2DModel(
        **{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}).eval()
    ref.load_state_dict(ours.state_dict())
    entry = json.loads((work / f"onnx_{args.lowerings[0]}" / "manifest.json").read_text())["components"]["transformer"]
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
    np.testing.assert_equal(True, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
