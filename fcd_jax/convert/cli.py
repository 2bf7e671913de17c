"""``python -m fcd_jax.convert SRC DST``: convert a checkpoint ahead of time; prints its arch."""

from __future__ import annotations

import argparse
import json
import sys

from fcd_jax import convert
from fcd_jax.errors import CheckpointError


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
        params, arch = convert.convert_checkpoint(
            args.src, image_size=args.image_size, num_heads=args.num_heads,
            gelu_approximate=args.gelu_approximate or None)
        directory = convert.save_converted(args.dst, params, arch)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(arch, indent=2))
    print(f"parameters: {convert.count_params(params):,}")
    print(f"written to {directory}")
    return 0
