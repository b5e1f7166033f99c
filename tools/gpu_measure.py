#!/usr/bin/env python
"""What a GPU machine with PyTorch + CUDA + Triton (no TensorRT, no onnxruntime-gpu needed) can measure.

    python tools/gpu_measure.py [--out DIR] [--preset real] [--sizes 1024] [--batches 1 2] [--iters 3]
    python tools/gpu_measure.py --dry-run        # what would run here, and why a part is skipped
    TRITON_INTERPRET=1 python tools/gpu_measure.py --device cpu --preset tiny --sizes 256 --batches 1
                                                 # the same code on a CPU (what the test suite runs)

1. The Triton MoE kernels (hidream_export/moe/kernels.py) against the PyTorch reference op at the preset's
   expert sizes and the token count of a 1024x1024 image: max error (relative to max |reference|) and
   achieved TFLOP/s, per dtype.
2. One forward of the preset's transformer (random weights, bf16) at each size and batch, with each MoE
   lowering (reference, dense, gather, plugin = the Triton kernels): seconds, achieved TFLOP/s against the
   FLOPs the model needs (TransformerConfig.forward_flops: 77.8 TFLOP for the real config at 1024x1024).
3. The projected transformer time of one image: Fast 16 steps, Dev 28 steps (batch 1), Full 50 steps with
   CFG (batch 2), from the fastest lowering.

Writes DIR/gpu_measure.json and DIR/gpu_measure.md (the table for the README). No network, no install:
run it with the repository on PYTHONPATH (tools/gpu_check.sh does).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOWERINGS = ("reference", "dense", "gather", "plugin")
PARTS = ("kernels", "forward", "projection")
RECIPES = (("Fast", 16, 1), ("Dev", 28, 1), ("Full", 50, 2))  # (variant, steps, transformer batch)


def _plan(args) -> tuple[list[tuple[str, str | None]], dict]:
    """The parts to run and why any is skipped (None: it runs), from what this machine has."""
    import os

    facts = {"python": sys.version.split()[0], "platform": platform.platform(), "device": args.device}
    try:
        import torch

        facts["torch"] = torch.__version__
        cuda = torch.cuda.is_available()
        facts["cuda"] = torch.version.cuda
        facts["gpu"] = torch.cuda.get_device_name(0) if cuda else None
    except ImportError as exc:
        torch, cuda = None, False
        facts["torch"] = f"missing ({exc})"
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        triton = None
        facts["triton"] = None
    no_device = None if (cuda or args.device == "cpu") else "no CUDA GPU visible to PyTorch"
    kernels = "triton is not installed" if triton is None else (
        "kernels on a CPU need TRITON_INTERPRET=1" if args.device == "cpu" and os.environ.get("TRITON_INTERPRET")
        != "1" else None)
    forward = no_device or (None if torch else "torch is not installed")
    why = {"kernels": no_device or kernels, "forward": forward, "projection": forward}
    parts = [(name, why[name] if name in args.parts else "not asked for (--parts)") for name in PARTS]
    if "projection" in args.parts and "forward" not in args.parts:
        parts[2] = ("projection", "needs the forward part")
    return parts, facts


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time(fn, iters: int, device="cuda") -> float:
    fn()  # warm-up: compiles kernels, settles the allocator
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def measure_kernels(config, tokens: int, iters: int, device: str = "cuda") -> list[dict]:
    import torch

    from hidream_export.moe import torch_op  # noqa: F401  (torch.ops.hidream.HiDreamMoE)
    from hidream_export.moe.kernels import moe_triton
    from hidream_export.moe.torch_op import moe_reference

    H, I, E, k = config.inner_dim, config.expert_hidden_dim, config.num_routed_experts, config.num_activated_experts
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(tokens, H, device=device, generator=g).to(dtype)
        ids = torch.stack([torch.randperm(E, device=device, generator=g)[:k] for _ in range(tokens)]).int()
        scores = torch.rand(tokens, k, device=device, generator=g).to(dtype)
        w = [torch.randn(E, a, b, device=device, generator=g).mul_(a ** -0.5).to(dtype)
             for a, b in ((H, I), (H, I), (I, H))]
        ref = moe_reference(x, ids, scores, *w).float()
        got = moe_triton(x, ids, scores, *w).float()
        seconds = _time(lambda: moe_triton(x, ids, scores, *w), iters, device)
        flops = 2 * tokens * k * 3 * H * I
        rows.append({"dtype": str(dtype).split(".")[1], "tokens": tokens, "hidden": H, "intermediate": I,
                     "experts": E, "top_k": k, "max_rel_err": float((got - ref).abs().max() / ref.abs().max()),
                     "seconds": seconds, "tflops": flops / seconds / 1e12})
    return rows


def _random_model(config, device: str):
    """The transformer with random bf16 weights on `device`, initialised in place (no host copy)."""
    import torch

    from hidream_export.model import HiDreamTransformer

    with torch.device("meta"):
        model = HiDreamTransformer(config, rope_dtype="float32")
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
    from hidream_export.model.embeddings import RopeTables

    model.rope = RopeTables(config.axes_dims_rope, model.rope.max_positions, "float32").to(device)
    return model.eval()


def measure_forward(config, sizes: list[int], batches: list[int], iters: int, device: str = "cuda") -> list[dict]:
    import torch

    import hidream_export.moe.torch_op  # noqa: F401  (defines the op the `plugin` lowering calls)
    from hidream_export.variants import TEXT_LENGTH, VAE_SCALE

    model = _random_model(config, device)
    rows = []
    for side in sizes:
        for batch in batches:
            lat = side // VAE_SCALE
            g = torch.Generator(device=device).manual_seed(1)
            bf = dict(device=device, dtype=torch.bfloat16)
            args = (torch.randn(batch, config.in_channels, lat, lat, generator=g, **bf),
                    torch.full((batch,), 500.0, device=device),
                    torch.randn(batch, TEXT_LENGTH, config.t5_dim, generator=g, **bf),
                    torch.randn(config.num_llama_layers, batch, TEXT_LENGTH, config.llama_dim, generator=g, **bf),
                    torch.randn(batch, config.text_emb_dim, generator=g, **bf))
            need = config.forward_flops(side, side, batch)
            outputs = {}
            for lowering in LOWERINGS:
                model.set_moe_lowering(lowering)
                with torch.no_grad():
                    try:
                        seconds = _time(lambda: model(*args), iters, device)
                        outputs[lowering] = model(*args).float()
                    except torch.cuda.OutOfMemoryError as exc:
                        rows.append({"size": side, "batch": batch, "lowering": lowering, "error": str(exc)[:200]})
                        torch.cuda.empty_cache()
                        continue
                ref = outputs.get("reference")
                cos = None
                if ref is not None:
                    o = outputs[lowering]
                    cos = float(torch.nn.functional.cosine_similarity(o.flatten(), ref.flatten(), dim=0))
                rows.append({"size": side, "batch": batch, "lowering": lowering, "seconds": seconds,
                             "tflop_needed": need / 1e12, "tflops": need / seconds / 1e12,
                             "cosine_vs_reference": cos})
    return rows


def project(forward_rows: list[dict], size: int) -> list[dict]:
    best = {}
    for r in forward_rows:
        if "seconds" in r and r["size"] == size:
            key = r["batch"]
            if key not in best or r["seconds"] < best[key]["seconds"]:
                best[key] = r
    rows = []
    for variant, steps, batch in RECIPES:
        if batch in best:
            rows.append({"variant": variant, "steps": steps, "batch": batch, "lowering": best[batch]["lowering"],
                         "transformer_seconds": steps * best[batch]["seconds"]})
    return rows


def to_markdown(report: dict) -> str:
    f = report["facts"]
    lines = [f"GPU: {f.get('gpu')}, torch {f.get('torch')} (CUDA {f.get('cuda')}), Triton {f.get('triton')}, "
             f"{report['date']}", ""]
    if report.get("kernels"):
        lines += ["| MoE kernels (Triton) | tokens | max rel. error vs reference | ms | TFLOP/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['tokens']} | {r['max_rel_err']:.2e} | {r['seconds'] * 1e3:.2f} | "
                  f"{r['tflops']:.3g} |" for r in report["kernels"]]
        lines.append("")
    if report.get("forward"):
        lines += ["| transformer forward (bf16) | size | batch | s | TFLOP/s (of the FLOPs needed) | cosine vs reference |",
                  "|---|---|---|---|---|---|"]
        for r in report["forward"]:
            if "error" in r:
                lines.append(f"| {r['lowering']} | {r['size']} | {r['batch']} | {r['error'][:60]} | | |")
            else:
                cos = "" if r["cosine_vs_reference"] is None else f"{r['cosine_vs_reference']:.5f}"
                lines.append(f"| {r['lowering']} | {r['size']} | {r['batch']} | {r['seconds']:.3f} | "
                             f"{r['tflops']:.3g} (of {r['tflop_needed']:.3g} TFLOP) | {cos} |")
        lines.append("")
    if report.get("projection"):
        lines += ["| image | steps | transformer batch | lowering | transformer time (s) |", "|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['steps']} | {r['batch']} | {r['lowering']} | {r['transformer_seconds']:.1f} |"
                  for r in report["projection"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "out" / "gpu_check"), help="where the JSON and table go")
    p.add_argument("--preset", default="real", help="transformer preset (real: the 17.1B config)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024], help="square image sides in px")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cuda", help="cuda, or cpu to run the same code on a CPU (tests)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="which measurements to run (projection needs forward)")
    p.add_argument("--dry-run", action="store_true", help="say what would run here, and why a part is skipped")
    args = p.parse_args(argv)
    from hidream_export.model.config import get_preset

    config = get_preset(args.preset)
    parts, facts = _plan(args)
    print(f"gpu_measure: preset {args.preset}, sizes {args.sizes}, batches {args.batches}; {facts}")
    for name, skip in parts:
        print(f"  {name:<10} {'SKIP: ' + skip if skip else ('would run' if args.dry_run else 'runs')}")
    if args.dry_run:
        return 0
    report = {"facts": facts, "preset": args.preset, "sizes": args.sizes, "date": time.strftime("%Y-%m-%d"),
              "skipped": {}}
    skip = dict(parts)
    side = max(args.sizes)
    if skip["kernels"] is None:
        tokens = (side // 16) ** 2 + 1 + 3 * 128  # a single-stream block's sequence at the largest size
        report["kernels"] = measure_kernels(config, tokens, args.iters, args.device)
    if skip["forward"] is None:
        report["forward"] = measure_forward(config, args.sizes, args.batches, args.iters, args.device)
    if skip["projection"] is None:
        report["projection"] = project(report["forward"], side)
    report["skipped"] = {name: why for name, why in parts if why}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_measure.json").write_text(json.dumps(report, indent=2) + "\n")
    table = to_markdown(report)
    (out / "gpu_measure.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
