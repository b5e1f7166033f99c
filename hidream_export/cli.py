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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hidream-export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="config, parameter counts and dtypes of a transformer checkpoint")
    p.add_argument("checkpoint", help="model folder, transformer/ folder or single .safetensors file")
    p.add_argument("--config", help="preset name or config.json (needed for single-file checkpoints)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        # Expected failures (bad input, bad checkpoint): one clear line, no traceback.
        print(f"hidream-export {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
