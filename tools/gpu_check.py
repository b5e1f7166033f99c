#!/usr/bin/env python
"""Helper of tools/gpu_check.sh: the GPU-side steps that need Python (one subcommand each).

    python tools/gpu_check.py build FOLDER [--plugin-impl jit|aot] [--static-sizes]
    python tools/gpu_check.py goldens FOLDER CKPT OUT_DIR [--size WxH] [--batch N]
    python tools/gpu_check.py polygraphy-onnx FOLDER INPUTS OUTPUTS --atol A
    python tools/gpu_check.py polygraphy-engine FOLDER INPUTS OUTPUTS --atol A
    python tools/gpu_check.py bench FOLDER CKPT [--iters N]
    python tools/gpu_check.py lora FOLDER CKPT

`polygraphy-*` run Polygraphy's own CLI (`polygraphy run ... --trt --load-inputs --load-outputs`) in this
process after registering the HiDreamMoE plugin, because Polygraphy's --plugins only loads .so files and
our plugin is a Python (tensorrt.plugin) one. Exit status: 0 pass, 1 fail, 2 error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

INPUT_ORDER = ("hidden_states", "timesteps", "encoder_hidden_states_t5", "encoder_hidden_states_llama3", "pooled_embeds")


def _manifest(folder: Path):
    """The folder's typed manifest (hidream_export.manifest owns the format)."""
    from hidream_export.manifest import Manifest

    return Manifest.read(folder)


def _transformer(folder: Path):
    """The typed transformer entry: dtype, size_range, batch_multiple, and what compare.random_feed takes."""
    from hidream_export.manifest import TRANSFORMER, TransformerComponent

    return _manifest(folder).component(TRANSFORMER, TransformerComponent, folder)


def cmd_build(args) -> int:
    from hidream_export.build.trt import build_engines

    t0 = time.perf_counter()
    from hidream_export.build.plan import TrtBuildOptions

    options = TrtBuildOptions(plugin_impl=args.plugin_impl, static_sizes=args.static_sizes,
                              refit=args.refit if args.refit != "true" else True)
    result = build_engines(args.folder, options=options)
    print(result.format())
    print(f"build took {time.perf_counter() - t0:.1f} s")
    return 0


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _engine_typed(feed: dict, dtype: str) -> dict:
    """Inputs as the engine takes them: activations in the export dtype. bf16 goes in as torch tensors,
    which Polygraphy's JSON format and TensorRT runner support (numpy has no bf16)."""
    import numpy as np
    import torch

    out = {}
    for name, value in feed.items():
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        if name == "timesteps":
            out[name] = arr
        elif dtype == "bf16":
            out[name] = torch.from_numpy(np.asarray(arr, dtype=np.float32)).to(torch.bfloat16)
        else:
            out[name] = np.asarray(arr, dtype={"fp32": np.float32, "fp16": np.float16}[dtype])
    return out


def cmd_goldens(args) -> int:
    """Polygraphy inputs/reference outputs in the engine's dtypes. Reuses `hidream-export compare`'s
    inputs.json/reference_outputs.json when present (converting their dtypes), else computes the PyTorch
    reference the same way compare does (fp32, `reference` MoE lowering, float64 RoPE)."""
    import numpy as np
    import torch
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import load_json, save_json

    folder, out_dir = Path(args.folder), Path(args.out_dir)
    entry = _transformer(folder)
    dtype = entry.dtype
    feeds, refs = None, None
    try:
        import ml_dtypes

        del ml_dtypes  # imported for its side effect: numpy can then read compare's bf16 arrays
    except ImportError:
        pass
    if (out_dir / "inputs.json").exists() and (out_dir / "reference_outputs.json").exists():
        try:
            feeds = load_json(str(out_dir / "inputs.json"))
            results = RunResults.load(str(out_dir / "reference_outputs.json"))
            refs = [dict(it) for it in results[0][1]]
            for f in feeds + refs:  # fails here (not later) if a dtype cannot be read back
                [np.asarray(v.float() if torch.is_tensor(v) else v, dtype=np.float32) for k, v in f.items()
                 if k != "timesteps"]
            print(f"converting {out_dir / 'inputs.json'} ({len(feeds)} feeds) to the engine dtype {dtype}")
        except Exception as exc:  # noqa: BLE001 - unreadable dtypes: recompute below
            print(f"cannot reuse compare's files ({type(exc).__name__}: {exc}); computing the reference")
            feeds, refs = None, None
    if feeds is None:
        from hidream_export.compare.parity import random_feed
        from hidream_export.model.checkpoint import load_transformer
        from hidream_export.variants import parse_size

        w, h = parse_size(args.size) if args.size else entry.size_range.opt
        batch = args.batch or entry.batch_multiple
        feed = random_feed(entry, w, h, batch, seed=0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_transformer(args.checkpoint, dtype=torch.float32, moe_lowering="reference",
                                 rope_dtype="float64").to(device)
        with torch.no_grad():
            ref = model(*(torch.from_numpy(feed[n]).to(device) for n in INPUT_ORDER)).float().cpu().numpy()
        feeds, refs = [feed], [{"sample": ref}]
        print(f"computed the PyTorch reference at {w}x{h}, batch {batch}")
    typed_feeds = [_engine_typed({k: np.asarray(v.float() if torch.is_tensor(v) else v) for k, v in f.items()}, dtype)
                   for f in feeds]
    typed_refs = [_engine_typed({k: np.asarray(v.float() if torch.is_tensor(v) else v, dtype=np.float32)
                                 for k, v in r.items()}, dtype) for r in refs]
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(typed_feeds, str(out_dir / "trt_inputs.json"))
    results = RunResults()
    results.append(("pytorch-reference", [IterationResult(r, runner_name="pytorch-reference") for r in typed_refs]))
    results.save(str(out_dir / "trt_reference_outputs.json"))
    scale = max(float(np.abs(np.asarray(r["sample"].float() if torch.is_tensor(r["sample"]) else r["sample"])).max())
                for r in typed_refs)
    (out_dir / "scale.json").write_text(json.dumps({"max_abs_reference": scale, "dtype": dtype}))
    print(f"wrote {out_dir / 'trt_inputs.json'} and {out_dir / 'trt_reference_outputs.json'} (max|ref| {scale:.4g})")
    return 0


def _register_plugins(folder: Path) -> None:
    from hidream_export.moe.loader import ensure_plugins, requirements_of

    print(ensure_plugins(requirements_of(_transformer(folder)), phase="build"))


def _polygraphy(argv: list[str]) -> int:
    from polygraphy.tools import main as polygraphy_main

    print("polygraphy " + " ".join(argv), flush=True)
    sys.argv = ["polygraphy", *argv]
    try:
        return int(polygraphy_main() or 0)
    except SystemExit as exc:
        return int(exc.code or 0)


def _shape_args(inputs: Path) -> list[str]:
    """--trt-{min,opt,max}-shapes equal to the first feed's shapes (one static profile)."""
    from polygraphy.json import load_json

    feed = load_json(str(inputs))[0]
    spec = " ".join(f"{name}:[{','.join(str(d) for d in tuple(value.shape))}]" for name, value in feed.items())
    args = []
    for kind in ("min", "opt", "max"):
        args += [f"--trt-{kind}-shapes", *spec.split(" ")]
    return args


def cmd_polygraphy_onnx(args) -> int:
    folder = Path(args.folder)
    _register_plugins(folder)
    from hidream_export.build.plan import write_prepared_onnx

    prepared = write_prepared_onnx(_manifest(folder).file_path(folder, "transformer"))
    return _polygraphy(["run", str(prepared), "--trt", "--strongly-typed", *_shape_args(Path(args.inputs)),
                        "--load-inputs", args.inputs, "--load-outputs", args.outputs, "--atol", str(args.atol),
                        "--rtol", "0", "--check-error-stat", "median"])


def cmd_polygraphy_engine(args) -> int:
    folder = Path(args.folder)
    _register_plugins(folder)
    manifest = _manifest(folder)
    found = manifest.engine_for("transformer")
    if found is None:
        print(f"{folder / 'manifest.json'}: no TensorRT engine for the transformer; run the build step first",
              file=sys.stderr)
        return 2
    return _polygraphy(["run", str(manifest.file_path(folder, found[0])), "--model-type", "engine", "--trt",
                        "--load-inputs", args.inputs, "--load-outputs", args.outputs, "--atol", str(args.atol),
                        "--rtol", "0", "--check-error-stat", "median"])


def _time_cuda(fn, warmup: int, iters: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def cmd_bench(args) -> int:
    """Milliseconds per transformer step at the export's opt size: PyTorch eager bf16 (reference MoE),
    PyTorch bf16 with the `triton` MoE lowering, and the TensorRT engine (host copies included, and its
    CUDA-event compute time)."""
    import numpy as np
    import torch

    import hidream_export.moe.torch_op  # noqa: F401  (defines torch.ops.hidream.HiDreamMoE, which `plugin` calls)
    from hidream_export.compare.parity import random_feed
    from hidream_export.model.checkpoint import load_transformer
    from hidream_export.runtime.trt_backend import TrtBackend

    folder = Path(args.folder)
    manifest = _manifest(folder)
    entry = _transformer(folder)
    w, h = entry.size_range.opt
    batch = entry.batch_multiple
    feed = random_feed(entry, w, h, batch, seed=1)
    dtype = _torch_dtype(entry.dtype)
    inputs = [torch.from_numpy(feed[n]).cuda() for n in INPUT_ORDER]
    inputs = [t if n == "timesteps" else t.to(dtype) for n, t in zip(INPUT_ORDER, inputs)]
    rows, outs = [], {}
    for label, lowering in (("pytorch eager bf16", "reference"), ("pytorch + triton MoE", "plugin")):
        model = load_transformer(args.checkpoint, dtype=dtype, device="cuda", moe_lowering=lowering,
                                 rope_dtype="float32")
        with torch.no_grad():
            ms = _time_cuda(lambda m=model: m(*inputs), args.warmup, args.iters)
            outs[label] = model(*inputs).float().cpu().numpy()
        rows.append((label, ms, None))
        del model
        torch.cuda.empty_cache()
    backend = TrtBackend()
    key = backend.component_key(manifest, "transformer")
    session = backend.load(manifest.file_path(folder, key), manifest.components[key])
    for _ in range(args.warmup):
        session.run(feed)
    session.timings.clear()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        got = session.run(feed)["sample"]
    ms = (time.perf_counter() - t0) / args.iters * 1e3
    compute = float(np.mean([t["compute_ms"] for t in session.timings]))
    outs["tensorrt engine"] = np.asarray(got, dtype=np.float32)
    rows.append(("tensorrt engine", ms, compute))
    base = rows[0][1]
    ref = outs["pytorch eager bf16"]
    print(f"\ntransformer step at {w}x{h}, batch {batch}, {entry.dtype} ({args.iters} iterations after {args.warmup} "
          f"warm-up), {torch.cuda.get_device_name()}")
    print(f"| {'backend':<22} | {'ms/step':>9} | {'speed-up':>8} | {'max|err|/max|eager|':>20} | {'cosine':>8} | "
          f"{'TRT compute ms':>14} |")
    print(f"|{'-' * 24}|{'-' * 11}|{'-' * 10}|{'-' * 22}|{'-' * 10}|{'-' * 16}|")
    worst = 1.0
    for label, ms, comp in rows:
        a, b = outs[label].ravel().astype(np.float64), ref.ravel().astype(np.float64)
        err = float(np.abs(a - b).max() / np.abs(b).max())
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        worst = min(worst, cos)
        print(f"| {label:<22} | {ms:>9.2f} | {base / ms:>7.2f}x | {err:>20.3e} | {cos:>8.5f} | "
              f"{(f'{comp:.2f}' if comp is not None else '-'):>14} |")
    # bf16 MoE routing can flip on near-ties, so elementwise error is reported, cosine decides
    return 0 if worst >= args.min_cosine else 1


def cmd_lora(args) -> int:
    """A LoRA on every attention projection applied at load time to the TensorRT engine (an in-place refit
    through the engine's name map), against PyTorch fp32 with the same LoRA fused; a fresh load with the
    LoRA must give the in-place refit's output, and refitting back the engine's own output, bit for bit."""
    import numpy as np
    import torch

    import hidream_export.moe.torch_op  # noqa: F401  (defines torch.ops.hidream.HiDreamMoE)
    from hidream_export.compare.parity import random_feed
    from hidream_export.lora import load_loras
    from hidream_export.manifest import Manifest
    from hidream_export.model.checkpoint import load_transformer
    from hidream_export.model.config import TransformerConfig
    from hidream_export.runtime.lora import resolve
    from hidream_export.runtime.trt_backend import TrtBackend
    from hidream_export.testing.loras import attention_modules, random_factors, write_lora

    folder = Path(args.folder)
    manifest = Manifest.read(folder)
    entry = manifest.transformer
    config = TransformerConfig.from_dict(entry.config)
    lora = write_lora(folder.parent / "gpu_check_lora.safetensors",
                      random_factors(config, attention_modules(config), rank=8, seed=0), "diffusers")
    requests = [(lora, 0.8)]
    update = resolve(folder, manifest, requests)
    backend = TrtBackend()
    key = backend.component_key(manifest, "transformer")
    path, engine = manifest.file_path(folder, key), manifest.components[key]
    w, h = entry.size_range.opt
    feed = random_feed(entry, w, h, entry.batch_multiple, seed=2)

    def run(session) -> np.ndarray:
        return np.asarray(session.run(feed)["sample"], dtype=np.float32)

    session = backend.load(path, engine)
    plain = run(session)
    t0 = time.perf_counter()
    session = backend.update_initializers(session, path, engine, update.initializers, {})
    refit_s = time.perf_counter() - t0
    with_lora = run(session)
    fresh = run(backend.load(path, engine, initializers=update.initializers))
    back = resolve(folder, manifest, [], update.applied)
    session = backend.update_initializers(session, path, engine, back.initializers, back.restore)
    restored = run(session)

    lora_set = load_loras(requests)
    model = load_transformer(args.checkpoint, dtype=torch.float32, device="cuda", moe_lowering="reference",
                             rope_dtype="float64")
    with torch.no_grad():
        for name in lora_set.keys:
            param = model.get_parameter(name)
            param.copy_(torch.from_numpy(lora_set.fused(name, param.detach().cpu().numpy())))
        ref = model(*(torch.from_numpy(feed[n]).cuda() for n in INPUT_ORDER)).float().cpu().numpy()

    def cosine(a, b) -> float:
        a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    checks = {"engine + LoRA vs PyTorch + LoRA (cosine)": cosine(with_lora, ref),
              "engine without LoRA vs PyTorch + LoRA (cosine, guard)": cosine(plain, ref)}
    for label, value in checks.items():
        print(f"{label}: {value:.6f}")
    same_fresh, same_back = np.array_equal(fresh, with_lora), np.array_equal(restored, plain)
    print(f"fresh load with the LoRA == in-place refit: {same_fresh}; refit back == the engine's own output: "
          f"{same_back}")
    ok = (checks["engine + LoRA vs PyTorch + LoRA (cosine)"] >= args.min_cosine and same_fresh and same_back
          and checks["engine without LoRA vs PyTorch + LoRA (cosine, guard)"] < checks[
              "engine + LoRA vs PyTorch + LoRA (cosine)"])
    print(f"refit of {len(update.initializers)} weights in {refit_s:.2f} s; {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("folder")
    b.add_argument("--plugin-impl", default="jit", choices=["jit", "aot"])
    b.add_argument("--static-sizes", action="store_true")
    b.add_argument("--refit", default="true", choices=["true", "identical"])
    b.set_defaults(func=cmd_build)
    g = sub.add_parser("goldens")
    g.add_argument("folder")
    g.add_argument("checkpoint")
    g.add_argument("out_dir")
    g.add_argument("--size")
    g.add_argument("--batch", type=int)
    g.set_defaults(func=cmd_goldens)
    for name, func in (("polygraphy-onnx", cmd_polygraphy_onnx), ("polygraphy-engine", cmd_polygraphy_engine)):
        q = sub.add_parser(name)
        q.add_argument("folder")
        q.add_argument("inputs")
        q.add_argument("outputs")
        q.add_argument("--atol", type=float, required=True)
        q.set_defaults(func=func)
    t = sub.add_parser("bench")
    t.add_argument("folder")
    t.add_argument("checkpoint")
    t.add_argument("--iters", type=int, default=10)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--min-cosine", type=float, default=0.99, help="fail if a backend's output is less similar to eager")
    t.set_defaults(func=cmd_bench)
    q = sub.add_parser("lora")
    q.add_argument("folder")
    q.add_argument("checkpoint")
    q.add_argument("--min-cosine", type=float, default=0.99)
    q.set_defaults(func=cmd_lora)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 - one line for the verdict table, the traceback for the log
        import traceback

        traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
