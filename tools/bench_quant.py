#!/usr/bin/env python
"""Quantized transformers against fp32, measured side by side in one run (`small` preset, Dev recipe).

    python tools/bench_quant.py [--workdir DIR] [--threads 2] [--repeats 3]
    python tools/bench_quant.py --policy            # what quantizing each weight group costs (PyTorch)
    python tools/bench_quant.py --scale real|large  # streaming int4 export of a big synthetic checkpoint

1. Exports (each in a fresh process): fp32, bf16 (the size baseline), int8 (block 128), int4 (block 64), the
   same two in bf16, and fp8 after `hidream-export calibrate` on a `small` model folder (2 prompts, 8 steps,
   512x512): wall time, peak RSS, weight file size and its ratio to the bf16 export's.
2. What ONNX Runtime's CPU optimizer makes of the blocked DequantizeLinear + MatMul (MatMulNBits count).
3. `compare` of each quantized fp32-graph export against the fp32 PyTorch reference at 512x512 and 1024x1024,
   at three of the Dev recipe's sampling timesteps: worst cosine, worst max error, worst routing agreement.
   int8 and int4 are measured at both MatMulNBits accuracy levels (1: float32 compute, 4: int8 compute).
4. One forward at 512x512, batch 1, `--threads` threads: diffusers' HiDreamImageTransformer2DModel in fp32
   eager (same weights) against ONNX Runtime CPU running the fp32 and quantized graphs.

Times are medians of --repeats runs after a warm-up; the ratios are what to read.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export import median_time  # noqa: E402  (the sibling benchmark's timing: same method, same numbers)

EXPORT_CHILD = r"""
import json, sys, time
from hidream_export.export.transformer import export_transformer
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
r = export_transformer(**args, force=True)
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": hwm,
                  "data_bytes": r.component.files["transformer/model.onnx.data"].bytes}))
"""

# name -> export_transformer keyword arguments (besides checkpoint, variant, out_dir)
EXPORTS = {
    "fp32": {},
    "bf16": {"dtype": "bf16"},
    "int8": {"quant": "int8"},
    "int8 acc4": {"quant": "int8", "ort_accuracy_level": 4},
    "int4": {"quant": "int4"},
    "int4 acc1": {"quant": "int4", "ort_accuracy_level": 1},
    "int8 bf16": {"quant": "int8", "dtype": "bf16"},
    "int4 bf16": {"quant": "int4", "dtype": "bf16"},
    "fp8": {"quant": "fp8"},
}
PROMPTS = "a red fox in the snow\na bowl of fruit on a wooden table\n"


def run_export(ckpt: Path, out: Path, **kwargs) -> dict:
    args = {"checkpoint": str(ckpt), "variant": "dev", "out_dir": str(out), "moe": "gather", **kwargs}
    proc = subprocess.run([sys.executable, "-c", EXPORT_CHILD, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"export {kwargs} failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fused_ops(model: Path, threads: int) -> dict:
    import onnx
    import onnxruntime as ort

    from hidream_export.manifest import Manifest

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.optimized_model_filepath = str(model.with_name("ort_optimized.onnx"))
    entry = Manifest.read(model.parent.parent).transformer
    for key, value in entry.quant.ort_session_config().items():
        opts.add_session_config_entry(key, value)
    ort.InferenceSession(str(model), opts)
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node]
    Path(opts.optimized_model_filepath).unlink()
    for p in model.parent.glob("ort_optimized.onnx*"):
        p.unlink()
    return {op: ops.count(op) for op in ("MatMulNBits", "DequantizeLinear", "MatMul", "Gemm")}


def main_table(args, work: Path) -> None:
    import torch

    from hidream_export.testing.model_folder import write_model_folder

    model = work / "small_model"
    if not (model / "model_index.json").exists():
        write_model_folder(model, "dev", "small", seed=0)
    amax = work / "amax.json"
    if not amax.exists():
        (work / "prompts.txt").write_text(PROMPTS)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hidream_export.cli", "calibrate", str(model), "--variant", "dev",
                        "--prompts", str(work / "prompts.txt"), "--out", str(amax), "--size", "512x512", "--steps",
                        "8", "--quiet"], check=True)
        print(f"calibration: 2 prompts x 8 steps at 512x512 in {time.perf_counter() - t0:.0f} s\n", flush=True)

    print(f"## exports (`small`, {sum(f.stat().st_size for f in (model / 'transformer').glob('*.safetensors')) / 2**20:.0f}"
          f" MiB fp32 checkpoint, gather lowering)\n")
    print("| export | wall time (s) | peak RSS (MiB) | model.onnx.data (MiB) | / bf16 export |")
    print("|---|---|---|---|---|")
    results = {}
    for name, kwargs in EXPORTS.items():
        if name == "fp8":
            kwargs = dict(kwargs, calibration=str(amax))
        results[name] = run_export(model, work / f"onnx_{name.replace(' ', '_')}", **kwargs)
    base = results["bf16"]["data_bytes"]
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['peak_rss'] / 2**20:.0f} | {r['data_bytes'] / 2**20:.1f} | "
              f"{r['data_bytes'] / base:.3f} |", flush=True)

    print("\n## ONNX Runtime CPU graph optimizer on the DequantizeLinear form\n")
    print("| export | MatMulNBits | DequantizeLinear left | MatMul | Gemm |")
    print("|---|---|---|---|---|")
    for name in ("int8", "int4"):
        ops = fused_ops(work / f"onnx_{name}" / "transformer" / "model.onnx", args.threads)
        print(f"| {name} | {ops['MatMulNBits']} | {ops['DequantizeLinear']} | {ops['MatMul']} | {ops['Gemm']} |",
              flush=True)

    from hidream_export.compare.parity import compare_onnx

    torch.set_num_threads(args.threads)
    print("\n## accuracy against the fp32 PyTorch reference (Dev timesteps "
          "1000 / middle / last, per size; worst case shown)\n")
    print("| export | size | min cosine | max rel err | min routing agreement | issue bound |")
    print("|---|---|---|---|---|---|")
    bounds = {"int8": "cos >= 0.9995, routing >= 99%", "int4": "cos >= 0.99, routing >= 99%", "fp8": "cos >= 0.99"}
    for name in ("int8", "int8 acc4", "int4", "int4 acc1", "fp8"):
        for size in args.sizes:
            report = compare_onnx(model, work / f"onnx_{name.replace(' ', '_')}" / "transformer" / "model.onnx",
                                  sizes=[size], timesteps="recipe")
            cases = report.cases
            routing = [c.routing_agreement for c in cases if c.routing_agreement is not None]
            print(f"| {name} | {size} | {min(c.cosine for c in cases):.6f} | {max(c.max_rel_err for c in cases):.3f} | "
                  f"{min(routing):.2%} | {bounds[name.split()[0]]}: {'holds' if report.passed else 'FAILS'} |",
                  flush=True)

    speed(args, model, work)


def speed(args, model: Path, work: Path) -> None:
    import diffusers
    import onnxruntime as ort
    import torch

    from hidream_export.compare.parity import random_feed
    from hidream_export.manifest import Manifest
    from hidream_export.model.checkpoint import load_transformer

    torch.set_num_threads(args.threads)
    ours = load_transformer(model, dtype=torch.float32)
    ref = diffusers.HiDreamImageTransformer2DModel(
        **{k: v for k, v in ours.config.to_dict().items() if not k.startswith("_")}).eval()
    ref.load_state_dict(ours.state_dict())
    del ours
    entry = Manifest.read(work / "onnx_fp32").transformer
    feed = random_feed(entry, 512, 512, 1, 0)
    feed["timesteps"][:] = 500.0
    targs = [torch.from_numpy(feed[n]) for n in ("hidden_states", "timesteps", "encoder_hidden_states_t5",
                                                  "encoder_hidden_states_llama3", "pooled_embeds")]
    rows = []
    with torch.no_grad():
        t_ref = median_time(lambda m=ref: m(*targs, return_dict=False), args.repeats)
    del ref
    rows.append(("PyTorch eager fp32, diffusers", t_ref))
    for name in ("fp32", "int8", "int8 acc4", "int4", "int4 acc1", "fp8"):
        folder = work / f"onnx_{name.replace(' ', '_')}"
        entry = Manifest.read(folder).transformer
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        for key, value in (entry.quant.ort_session_config() if entry.quant else {}).items():
            opts.add_session_config_entry(key, value)
        sess = ort.InferenceSession(str(folder / "transformer" / "model.onnx"), opts)
        rows.append((f"ONNX Runtime CPU, {name}", median_time(lambda s=sess: s.run(None, feed), args.repeats)))
        del sess
    print(f"\n## one transformer forward, 512x512, batch 1, {args.threads} threads\n")
    print("| runner | seconds | / diffusers eager |")
    print("|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.3f} | {t / t_ref:.2f} |")


def policy(args, work: Path) -> None:
    """Cosine of the PyTorch reference with one weight group quantized (dequantized weights), per scheme."""
    import fnmatch

    import numpy as np
    import torch

    from hidream_export.compare.parity import metrics, random_feed, sampling_timesteps
    from hidream_export.manifest import Manifest
    from hidream_export.model.checkpoint import load_transformer
    from hidream_export.quant.policy import TRANSFORMER_KEPT
    from hidream_export.quant.scheme import QuantScheme
    from hidream_export.quant.weights import quantize_weight
    from hidream_export.testing.checkpoints import write_transformer

    torch.set_num_threads(args.threads)
    ckpt = work / "small_ckpt"
    if not (ckpt / "transformer" / "config.json").exists():
        write_transformer(ckpt / "transformer", "small", seed=0)
    if not (work / "onnx_fp32" / "manifest.json").exists():
        run_export(ckpt, work / "onnx_fp32")
    entry = Manifest.read(work / "onnx_fp32").transformer
    feed = random_feed(entry, 512, 512, 1, 0)
    feed["timesteps"][:] = sampling_timesteps("dev")[1]
    targs = [torch.from_numpy(feed[n]) for n in ("hidden_states", "timesteps", "encoder_hidden_states_t5",
                                                  "encoder_hidden_states_llama3", "pooled_embeds")]
    model = load_transformer(ckpt, dtype=torch.float32, moe_lowering="gather", rope_dtype="float64").eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(*targs).numpy()

    def dequantized(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        q = quantize_weight(tuple(w.shape), [w.numpy().tobytes()], scheme)
        codes = q.codes
        if scheme.scheme == "int4":  # two signed nibbles per byte, low first
            codes = np.stack([codes & 15, codes >> 4], axis=-1).reshape(codes.shape[0], -1).astype(np.int8)
            codes = np.where(codes > 7, codes - 16, codes)
        return torch.from_numpy((codes * np.repeat(q.scales, scheme.block_size, axis=0)).T.astype(np.float32))

    groups = {"attention": "*.attn1.to_*", "routed experts": "*.ff_i.experts.*",
              "shared experts": "*.ff_i.shared_experts.*", "text FFN (ff_t)": "*.ff_t.*",
              "block adaLN modulation": "*_blocks.*.adaLN_modulation.*", "caption projections": "caption_projection.*"}
    groups.update({f"kept: {g.name}": g.patterns[0] for g in TRANSFORMER_KEPT})
    print("## what each weight group costs when quantized alone (`small`, 512x512, PyTorch, dequantized weights)\n")
    print("| group | share of weights | int8 b128 cosine | int4 b64 cosine |")
    print("|---|---|---|---|")
    total = sum(v.numel() for v in state.values())
    for group, pattern in groups.items():
        keys = [k for k, v in state.items() if v.dim() == 2 and fnmatch.fnmatchcase(k, pattern)]
        cells = []
        for scheme in (QuantScheme("int8", 128), QuantScheme("int4", 64)):
            if any(state[k].shape[1] % scheme.block_size for k in keys):
                cells.append("n/a (block)")
                continue
            model.load_state_dict({**state, **{k: dequantized(state[k], scheme) for k in keys}})
            with torch.no_grad():
                cells.append(f"{metrics(model(*targs).numpy(), ref)['cosine']:.6f}")
        share = sum(state[k].numel() for k in keys) / total
        print(f"| {group} | {share:.2%} | {' | '.join(cells)} |", flush=True)


def scale(args, work: Path) -> None:
    import math
    import shutil

    import torch

    from hidream_export.model import PRESETS
    from hidream_export.model.checkpoint import expected_shapes
    from hidream_export.testing.checkpoints import write_transformer

    ckpt = work / f"{args.scale}_bf16"
    if not (ckpt / "transformer" / "config.json").exists():
        write_transformer(ckpt / "transformer", args.scale, dtype=torch.bfloat16, shards=7 if args.scale == "real" else 2)
    size = sum(f.stat().st_size for f in (ckpt / "transformer").glob("*.safetensors"))
    largest = max(math.prod(s) for s in expected_shapes(PRESETS[args.scale]).values())
    print(f"## streaming int4 export of `{args.scale}` ({PRESETS[args.scale].parameter_counts()['total'] / 1e9:.2f} B "
          f"parameters, {size / 2**30:.2f} GiB bf16 checkpoint, largest tensor {largest * 2 / 2**20:.0f} MiB)\n")
    print("| export | wall time (s) | peak RSS (MiB) | model.onnx.data (GiB) | / checkpoint |")
    print("|---|---|---|---|---|")
    for dtype in ("bf16", "fp32"):
        out = work / f"{args.scale}_int4_{dtype}"
        r = run_export(ckpt, out, quant="int4", dtype=dtype)
        print(f"| int4 block 64, {dtype} rest | {r['seconds']:.0f} | {r['peak_rss'] / 2**20:.0f} | "
              f"{r['data_bytes'] / 2**30:.2f} | {r['data_bytes'] / size:.3f} |", flush=True)
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", nargs="+", default=["512x512", "1024x1024"])
    p.add_argument("--policy", action="store_true", help="per-group quantization cost only")
    p.add_argument("--scale", choices=["real", "large"], default=None,
                   help="streaming int4 export of a synthetic checkpoint of this preset (real: ~34 GB on disk)")
    p.add_argument("--speed-only", action="store_true", help="section 4 only (exports from an earlier run)")
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_quant_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.policy:
        policy(args, work)
    elif args.scale:
        scale(args, work)
    elif args.speed_only:
        speed(args, work / "small_model", work)
    else:
        main_table(args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
