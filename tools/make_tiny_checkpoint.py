#!/usr/bin/env python
"""Write a random-weight HiDream-I1 checkpoint in the real on-disk layout (no download needed).

    python tools/make_tiny_checkpoint.py OUT_DIR [--preset tiny|small|real] [--seed N] [--shards N]
        [--dtype fp32|fp16|bf16]

OUT_DIR becomes a model folder with OUT_DIR/transformer/ (config.json + safetensors, sharded with an
index file when --shards > 1). `--preset real` writes the 17.1B layout (~34 GB in bf16): asked for
explicitly only.
"""

import argparse
import sys
from pathlib import Path

import torch

from hidream_export.tiny import write_transformer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--preset", default="tiny", help="tiny, small or real (default tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=None, help="number of safetensors shards (default: one file)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="on-disk dtype (default fp32 for tiny/small, bf16 for real)")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.preset == "real" else torch.float32)
    shards = args.shards if args.shards is not None else (7 if args.preset == "real" else None)
    out = write_transformer(args.out_dir / "transformer", args.preset, seed=args.seed, dtype=dtype, shards=shards)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
