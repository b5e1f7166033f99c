"""`hidream-export` command line: thin wrappers over the Python API, one subcommand per stage."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from hidream_export.info import checkpoint_info, format_info

    info = checkpoint_info(args.checkpoint, config=args.config)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_export(args) -> int:
    from hidream_export.export.transformer import export_transformer

    entry = export_transformer(
        args.checkpoint, args.variant, args.out, moe=args.moe, dtype=args.dtype, opset=args.opset,
        min_size=args.min_size, max_size=args.max_size, opt_size=args.opt_size, config=args.config,
        force=args.force, streaming=not args.no_streaming, dry_run=args.dry_run, quiet=args.quiet)
    if args.dry_run:
        print(entry["text"])
        return 0
    out = args.out or f"engines/{args.variant}"
    if entry.get("reused"):
        print(f"{out}/{entry['path']} is up to date (same checkpoint and settings): reused")
        return 0
    r = entry["size_range"]
    print(f"wrote {out}/{entry['path']} (+ external data), {entry['initializers']} initializers, "
          f"moe={entry['moe_lowering']}, dtype={entry['dtype']}, opset={entry['opset']}, "
          f"sizes {r['min'][0]}x{r['min'][1]}..{r['max'][0]}x{r['max'][1]}, batch {entry['axes']['batch'][0]}.."
          f"{entry['axes']['batch'][1]}, {entry['export_seconds']} s")
    return 0


def _cmd_compare(args) -> int:
    from hidream_export.compare.parity import compare_onnx

    report = compare_onnx(args.checkpoint, args.model, sizes=args.sizes, batch=args.batch, seed=args.seed,
                          atol=args.atol, rtol=args.rtol, min_cosine=args.min_cosine, save_dir=args.save_dir,
                          config=args.config)
    print(report.format())
    return 0 if report.passed else 1


def _cmd_build(args) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from hidream_export.build import trt as trt_build

    trt_options = trt_build.options_from_args(args)
    if args.dry_run:
        if not args.trt:
            raise ValueError("--dry-run goes with --trt (it prints the TensorRT engine build plan); "
                             "for the ONNX export plan use `hidream-export export --dry-run`")
        result = trt_build.build_engines(args.out or f"engines/{args.variant}", dry_run=True, **trt_options)
        print(json.dumps(result.plan.to_dict(), indent=2) if args.json else result.plan.format())
        return 0
    from hidream_export.build.pipeline import build_pipeline

    manifest = build_pipeline(
        args.checkpoint, args.variant, args.out, llama=args.llama, moe=args.moe, dtype=args.dtype,
        encoder_dtype=args.encoder_dtype, force=args.force, trt=args.trt, opset=args.opset, link=args.link,
        trt_options=trt_options)
    out = args.out or f"engines/{args.variant}"
    print(f"built {out}: " + ", ".join(sorted(manifest["components"])))
    return 0


def _cmd_generate(args) -> int:
    from hidream_export.runtime import generate

    return generate.run(args)


def _cmd_demo(args) -> int:
    """The README's main job: tiny random checkpoint -> engine folder -> image, all local."""
    from pathlib import Path

    from hidream_export.build.pipeline import build_pipeline
    from hidream_export.tiny_pipeline import write_model_folder

    ckpt = Path(args.checkpoints) / f"tiny-{args.variant}"
    if not (ckpt / "model_index.json").exists():
        write_model_folder(ckpt, args.variant, "tiny", seed=0, overwrite=True)
        print(f"wrote the tiny random-weight checkpoint {ckpt}")
    out = Path(args.out or f"engines/{args.variant}")
    build_pipeline(ckpt, args.variant, out)
    print(f"built {out}")
    from hidream_export.runtime import generate

    parser = generate.add_arguments(argparse.ArgumentParser(prog="hidream-export generate"))
    gen_args = parser.parse_args([str(out), "--prompt", args.prompt, "--seed", str(args.seed), "-o", args.output,
                                  "--width", "256", "--height", "256", "--any-size"])
    return generate.run(gen_args)


def _cmd_lint(args) -> int:
    from hidream_export.export import lint

    return lint.main(args.argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hidream-export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="config, parameter counts and dtypes of a transformer checkpoint")
    p.add_argument("checkpoint", help="model folder, transformer/ folder or single .safetensors file")
    p.add_argument("--config", help="preset name or config.json (needed for single-file checkpoints)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_info)

    from hidream_export.variants import VARIANTS

    p = sub.add_parser("export", help="export the transformer to ONNX (weights as external data)")
    p.add_argument("checkpoint", help="model folder, transformer/ folder or single .safetensors file")
    p.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    p.add_argument("--out", help="output folder (default engines/VARIANT)")
    p.add_argument("--moe", default="gather", choices=["dense", "gather", "plugin"],
                   help="MoE lowering: gather (exact FLOPs, ONNX Runtime default), dense (static, ~1.8x routed "
                        "FLOPs), plugin (one HiDreamMoE node per layer for TensorRT)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20)")
    p.add_argument("--min-size", help="smallest WxH in pixels (default from the variant)")
    p.add_argument("--max-size", help="largest WxH in pixels")
    p.add_argument("--opt-size", help="WxH the TensorRT profile optimises for")
    p.add_argument("--config", help="preset or config.json (single-file checkpoints)")
    p.add_argument("--force", action="store_true", help="replace an export of another checkpoint/variant in --out")
    p.add_argument("--dry-run", action="store_true", help="print the files, sizes, dtype and initializer count; write nothing")
    p.add_argument("--no-streaming", action="store_true",
                   help="export a loaded model (holds all weights in memory) instead of streaming them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("compare", help="PyTorch reference vs ONNX Runtime on the same random inputs")
    p.add_argument("checkpoint")
    p.add_argument("model", help="the exported model.onnx (its folder's manifest.json is read)")
    p.add_argument("--sizes", nargs="+", help="WxH sizes (default: opt, min, max and a non-square size)")
    p.add_argument("--batch", type=int, default=None, help="transformer batch (default: one image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atol", type=float, default=None)
    p.add_argument("--rtol", type=float, default=None, help="relative to max|reference| (default by dtype)")
    p.add_argument("--min-cosine", type=float, default=None)
    p.add_argument("--save-dir", default=".", help="where inputs.json and reference_outputs.json go (default .)")
    p.add_argument("--config", help="preset or config.json (single-file checkpoints)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("build", help="export every component of a variant into one engine folder")
    p.add_argument("checkpoint", help="a HiDream-I1 model folder (diffusers layout)")
    p.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    p.add_argument("--out", help="engine folder (default engines/VARIANT)")
    p.add_argument("--llama", help="Llama-3.1-8B-Instruct folder (default CHECKPOINT/llama)")
    p.add_argument("--moe", default="gather", choices=["dense", "gather", "plugin"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="transformer dtype")
    p.add_argument("--encoder-dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--opset", type=int, default=20)
    p.add_argument("--link", default="auto", choices=["auto", "reflink", "hardlink", "copy"],
                   help="how variant folders get shared encoder/VAE files (auto: reflink, else copy)")
    p.add_argument("--trt", action="store_true", help="also build TensorRT engines (needs TensorRT)")
    p.add_argument("--dry-run", action="store_true", help="with --trt: print the engine build plan only")
    p.add_argument("--force", action="store_true", help="re-export everything")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    from hidream_export.build import trt as trt_build

    trt_build.add_arguments(p)
    p.set_defaults(func=_cmd_build)

    from hidream_export import doctor

    p = sub.add_parser("doctor", help="what this machine can run and build (TensorRT, CUDA, GPU, ORT, Triton)")
    doctor.add_arguments(p)
    p.set_defaults(func=doctor.run)

    from hidream_export.runtime import generate

    p = generate.add_arguments(sub.add_parser("generate", help="prompt -> image with the torch-free runtime"))
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("demo", help="tiny random checkpoint -> engine folder -> image (no download)")
    p.add_argument("--variant", default="fast", choices=sorted(VARIANTS))
    p.add_argument("--checkpoints", default="checkpoints", help="where the tiny checkpoint is written")
    p.add_argument("--out", help="engine folder (default engines/VARIANT)")
    p.add_argument("--prompt", default="a painting of a squirrel eating a burger")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", default="demo.png")
    p.set_defaults(func=_cmd_demo)

    # The lint owns its arguments (and imports onnx, which the runtime-only install lacks): forward them.
    p = sub.add_parser("lint", add_help=False,
                       help="check an ONNX model against TensorRT's published ONNX operator support")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_lint)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SystemExit as exc:  # argparse inside a forwarded subcommand
        return int(exc.code or 0)
    except (ValueError, FileNotFoundError, PermissionError, ImportError, RuntimeError) as exc:
        # Expected failures (bad input, bad checkpoint, missing TensorRT or plugin, failed engine build):
        # one clear line, no traceback. ImportError/RuntimeError cover TensorRTUnavailable,
        # MissingPluginError and BuildError, whose messages say what is missing and how to get it.
        print(f"hidream-export {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
