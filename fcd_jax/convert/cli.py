"""``python -m fcd_jax.convert SRC DST``: convert a checkpoint ahead of time; prints its arch."""

from __future__ import annotations

import argparse
import json
import os
import sys

from fcd_jax import convert
from fcd_jax.convert.arrays import one_line
from fcd_jax.errors import CheckpointError
from fcd_jax.writable import unwritable_reason


def check_destination(dst: str) -> None:
    """One ``CheckpointError`` line if ``dst`` cannot become the converted folder: an existing
    file, or a place that cannot be written (a non-empty folder: ``save_converted``)."""
    problem = unwritable_reason(dst)
    if problem:
        raise CheckpointError(f"cannot write {dst}: {problem}; choose a DST you can write")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fcd_jax.convert", description=convert.__doc__.split("\n")[0])
    parser.add_argument("src", help="Google .npz, timm/DINOv2 .safetensors/.pth/.bin, or a "
                                    "HuggingFace/timm folder")
    parser.add_argument("dst", help="output folder (orbax checkpoint + arch.json)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="resample the position embedding to this input size")
    parser.add_argument("--num_heads", type=int, default=None,
                        help="heads, for timm files of a non-standard width")
    parser.add_argument("--gelu_approximate", action="store_true",
                        help="Google .npz: record the tanh GELU (vit_jax's Flax code) instead")
    args = parser.parse_args(argv)
    try:
        check_destination(args.dst)  # before converting: nothing is written on a bad one
        params, arch = convert.convert_checkpoint(
            args.src, image_size=args.image_size, num_heads=args.num_heads,
            gelu_approximate=args.gelu_approximate or None)
        directory = convert.save_converted(args.dst, params, arch)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a write that failed all the same (a full disk)
        why = os.strerror(error.errno) if error.errno else one_line(error)
        print(f"error: cannot write {error.filename or args.dst} ({why}): free some space or "
              "choose another DST", file=sys.stderr)  # fmt: skip
        return 1
    print(json.dumps(arch, indent=2))
    print(f"parameters: {convert.count_params(params):,}")
    print(f"written to {directory}")
    return 0
