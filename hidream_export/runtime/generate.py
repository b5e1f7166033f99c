"""`hidream-export generate DIR --prompt ... -o out.png`: the runtime from the command line.

Kept out of cli.py so the command imports only the runtime (no torch): cli.py registers it with

    p = sub.add_parser("generate", help=...)
    generate.add_arguments(p)
    p.set_defaults(func=generate.run)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the generate options to ``parser`` (a subcommand parser or a standalone one)."""
    parser.add_argument("dir", metavar="DIR", help="engine folder written by `hidream-export build`")
    parser.add_argument("--prompt", required=True, help="what to draw")
    parser.add_argument("--negative-prompt", default=None,
                        help="what to steer away from (CFG only, i.e. guidance > 1; default \"\")")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the variant's recipe)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale; CFG runs when > 1 (default: the variant's recipe)")
    parser.add_argument("--width", type=int, default=None, help="image width in px (multiple of 16)")
    parser.add_argument("--height", type=int, default=None, help="image height in px (multiple of 16)")
    parser.add_argument("--any-size", action="store_true",
                        help="use --width/--height as given instead of HiDream's rescaling to ~1 MP")
    parser.add_argument("--scheduler-flavour", choices=("diffusers", "official"), default="diffusers",
                        help="scheduler as the diffusers model folders configure it (default) or as the "
                             "official HiDream-I1 repository implements it")
    parser.add_argument("--backend", default="ort", help="ort (onnxruntime, default) or trt (TensorRT engines)")
    parser.add_argument("--providers", default=None,
                        help="comma-separated onnxruntime execution providers (default: CUDA if present, else CPU)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the SHA-256 check of the folder's files (sizes are still checked)")
    parser.add_argument("--json", metavar="REPORT.json", default=None, help="write settings and timings as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no timing table")
    parser.add_argument("-o", "--output", required=True, help="image file to write (.png, .jpg, .webp, ...)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Generate one image as ``args`` say; 0 on success, 2 for a request or folder that cannot work
    (the message says why), 1 for the caller's other failures (raised)."""
    from ..manifest import ManifestError
    from .backends import BackendUnavailable
    from .pipeline import Pipeline
    from .report import write_json

    out = Path(args.output)
    try:
        _check_output(out)
        providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
        pipe = Pipeline.from_dir(args.dir, backend=args.backend, providers=providers,
                                 scheduler_flavour=args.scheduler_flavour, threads=args.threads,
                                 verify=not args.no_verify, progress=False if args.quiet else None)
        result = pipe(args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
                      steps=args.steps, guidance_scale=args.guidance, seed=args.seed, any_size=args.any_size)
    except (ManifestError, BackendUnavailable, ValueError, TypeError) as exc:
        print(f"hidream-export generate: error: {exc}", file=sys.stderr)
        return 2

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")  # keep the suffix: PIL picks the format by it
    result.image.save(tmp)
    tmp.replace(out)
    if args.json:
        report = result.report()
        report["output"] = str(out)
        report["folder"] = str(args.dir)
        report["load_timings"] = pipe.load_timings.as_dict()
        write_json(args.json, report)
    if not args.quiet:
        cfg = f", guidance {result.guidance_scale:g}" if result.info.get("cfg") else ""
        print(f"wrote {out}: {result.width}x{result.height}, {result.steps} steps{cfg}, seed {result.seed}, "
              f"{result.timings.total('total'):.2f} s ({result.info['backend']})")
        print(result.timings.table())
    return 0


def _check_output(path: Path) -> None:
    """Fail before generating when the image could not be written (unknown format, a folder)."""
    from PIL import Image

    if path.is_dir():
        raise ValueError(f"-o {path} is a folder; give an image file name")
    Image.init()
    if path.suffix.lower() not in Image.EXTENSION:
        raise ValueError(f"-o {path}: unknown image format {path.suffix!r}; use .png, .jpg or .webp")


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m hidream_export.runtime.generate``)."""
    parser = add_arguments(argparse.ArgumentParser(prog="hidream-export generate", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
