#!/usr/bin/env python
"""Write a random-weight HiDream-I1 checkpoint in the real on-disk layout (no download needed).

    python tools/make_tiny_checkpoint.py OUT_DIR [--preset tiny|small|large|real] [--seed N] [--shards N]
        [--dtype fp32|fp16|bf16] [--full [--variant full|dev|fast] [--overwrite]]

Without --full, OUT_DIR becomes a model folder with OUT_DIR/transformer/ only (config.json +
safetensors, sharded with an index file when --shards > 1).

With --full, OUT_DIR becomes a complete HiDream-I1-{Full,Dev,Fast} diffusers folder: model_index.json,
scheduler (per --variant), transformer, CLIP-L/CLIP-G/T5 encoders and tokenizers, VAE, plus OUT_DIR/llama
(the Llama-3.1 text encoder and tokenizer the HF repos do not ship). --dtype and --shards then apply to
the transformer; the other components are small fp32 models whatever the preset. An existing non-empty
OUT_DIR is replaced only with --overwrite.

`--preset real` writes the 17.1B transformer layout (~34 GB in bf16): asked for explicitly only.
"""

import argparse
import sys
from pathlib import Path

import torch

from hidream_export.testing.checkpoints import write_transformer
from hidream_export.variants import VARIANTS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--preset", default="tiny", help="tiny, small, large (3.1B, for the export scaling benchmark) or real (default tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=None, help="number of safetensors shards (default: one file)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="on-disk dtype of the transformer (default fp32 for tiny/small, bf16 for real)")
    p.add_argument("--full", action="store_true",
                   help="write the complete model folder (all components + llama/), not just transformer/")
    p.add_argument("--variant", choices=sorted(VARIANTS), default=None,
                   help="with --full: whose scheduler_config.json to write (default full)")
    p.add_argument("--overwrite", action="store_true", help="with --full: replace a non-empty OUT_DIR")
    args = p.parse_args(argv)
    if not args.full and (args.variant or args.overwrite):
        p.error("--variant and --overwrite only apply to --full (the transformer alone has no variant)")

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.preset == "real" else torch.float32)
    shards = args.shards if args.shards is not None else (7 if args.preset == "real" else None)
    if args.full:
        from hidream_export.testing.model_folder import write_model_folder

        try:
            out = write_model_folder(args.out_dir, args.variant or "full", args.preset, seed=args.seed,
                                     overwrite=args.overwrite, transformer_dtype=dtype, transformer_shards=shards)
        except FileExistsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        out = write_transformer(args.out_dir / "transformer", args.preset, seed=args.seed, dtype=dtype, shards=shards)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
