"""An experiment, not a production path: the ViT's dense layers (q, k, v, out, MLP; forward and
backward) through MKL's ``cblas_sgemm`` in an XLA FFI custom call, to measure what GEMMs at MKL's
rate would give the production step (BENCHMARKS.md "Where the time goes").

    pip install mkl    # MKL's shared libraries into the venv's lib/
    python -m benchmarks.mkl_dense --variant=S/16 --batch=8 --score_batch=8 --steps=4 \\
        --score_steps=1 --warmup=1 --impls=jax,torch

builds ``mkl_dense.cc`` with g++ against JAX's FFI headers, routes every flax ``Dense`` /
``DenseGeneral`` contraction (``jax.lax.dot_general`` without batch dimensions) through it, keeps
their outputs for the backward as ``remat_policy="dots"`` keeps the dots' (by name), and runs
``benchmarks.bench`` with the arguments given: the bench's agreement check runs first.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("MKL_THREADING_LAYER", "GNU")  # the OpenMP runtime PyTorch loads too

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.ad_checkpoint import checkpoint_name  # noqa: E402

MKL_LIBRARY = Path(sys.prefix) / "lib" / "libmkl_rt.so.3"
DENSE_OUTPUT = "mkl_dense_output"
TRACED = {"mkl": 0, "xla": 0}  # contractions traced each way, printed at exit


def build_and_register() -> None:
    """Compiles the handler into a temporary directory and registers it as ``mkl_gemm``."""
    if not MKL_LIBRARY.exists():
        raise SystemExit(f"no {MKL_LIBRARY}: pip install mkl into this venv first")
    library = Path(tempfile.mkdtemp(prefix="fcd_mkl_")) / "libmkl_dense.so"
    source = Path(__file__).with_suffix(".cc")
    command = ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
               str(source), "-o", str(library), f"-L{MKL_LIBRARY.parent}",
               f"-l:{MKL_LIBRARY.name}", f"-Wl,-rpath,{MKL_LIBRARY.parent}"]
    try:
        subprocess.run(command, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        raise SystemExit(f"could not build {source.name} ({error}): it needs g++ with C++17"
                         ) from None
    handler = ctypes.cdll.LoadLibrary(str(library)).MklGemm
    jax.ffi.register_ffi_target("mkl_gemm", jax.ffi.pycapsule(handler), platform="cpu")


def mkl_gemm(a: jax.Array, b: jax.Array, trans_a: bool, trans_b: bool) -> jax.Array:
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    result = jax.ShapeDtypeStruct((m, n), jnp.float32)
    return jax.ffi.ffi_call("mkl_gemm", result, vmap_method="sequential")(
        a, b, trans_a=trans_a, trans_b=trans_b)


@jax.custom_vjp
def mkl_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return mkl_gemm(a, b, False, False)


def _matmul_fwd(a, b):
    return mkl_gemm(a, b, False, False), (a, b)


def _matmul_bwd(residuals, d_out):
    a, b = residuals  # d_a = d_out b^T, d_b = a^T d_out: MKL reads the transposes in place
    return mkl_gemm(d_out, b, False, True), mkl_gemm(a, d_out, True, False)


mkl_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(xla_dot_general, lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None, **kwargs):
    """A dense layer's contraction (lhs's trailing dims with rhs's leading ones, no batch dims,
    float32) as one MKL GEMM; anything else as XLA's dot."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    lead = lhs.ndim - len(lhs_contract)
    if (lhs_batch or rhs_batch or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32
            or tuple(lhs_contract) != tuple(range(lead, lhs.ndim))
            or tuple(rhs_contract) != tuple(range(len(rhs_contract)))):
        TRACED["xla"] += 1
        return xla_dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
    TRACED["mkl"] += 1
    k = math.prod(lhs.shape[lead:])
    out = mkl_matmul(lhs.reshape(-1, k), rhs.reshape(k, -1))
    out = checkpoint_name(out, DENSE_OUTPUT)
    return out.reshape(*lhs.shape[:lead], *rhs.shape[len(rhs_contract):])


def install() -> None:
    """Routes flax's dense layers through MKL (flax calls ``jax.lax.dot_general`` by attribute;
    jnp.einsum, the attention's products, does not) and keeps their outputs under remat."""
    from fcd_jax.models import vit

    build_and_register()
    atexit.register(lambda: print(f"flax dense contractions traced through MKL: {TRACED['mkl']}, "
                                  f"through XLA: {TRACED['xla']}"))
    jax.lax.dot_general = functools.partial(dense_dot_general, jax.lax.dot_general)
    policies = jax.checkpoint_policies
    vit.REMAT_POLICIES["dots"] = policies.save_from_both_policies(
        vit.REMAT_POLICIES["dots"], policies.save_only_these_names(DENSE_OUTPUT))


if __name__ == "__main__":
    from benchmarks import bench

    # As bench.py's own re-execution, but before the patch (bench.main, called from here, does not
    # re-execute: that would start a process without it).
    bench.reexec_with_huge_pages(sys.argv[1:], module="benchmarks.mkl_dense")
    install()
    bench.main(sys.argv[1:])
