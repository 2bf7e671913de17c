"""JAX's persistent compilation cache for the command-line entry points (``fcd_jax.main``,
``fcd_jax.ablation``): a compiled program is kept on disk and read back by the next process
that compiles the same program on the same backend (a resumed run, ``--mode=eval`` after
training, the next config of the same sizes), instead of compiled again. Compilation is most of
a small job's fixed cost (BENCHMARKS.md, "The whole job"); the cached program is the same
executable, so the numbers do not change.

The folder: ``--compilation_cache`` (default ``$JAX_COMPILATION_CACHE_DIR``, else
``~/.cache/fcd_jax/xla``); an empty value turns the cache off. Programs that compile in under a
second are not stored (JAX's default threshold).
"""

from __future__ import annotations

import os

import jax
from absl import flags, logging
from jax.experimental.compilation_cache import compilation_cache

DEFAULT_DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
    "~", ".cache", "fcd_jax", "xla")


def define_flag() -> None:
    """``--compilation_cache``, for an entry point's flags."""
    flags.DEFINE_string(
        "compilation_cache", DEFAULT_DIR,
        "Folder of JAX's persistent compilation cache (programs compiled by an earlier run are "
        "read back instead of compiled again); '' turns it off.")


def enable(directory: str) -> None:
    """Points JAX's persistent compilation cache at ``directory`` (``~`` expanded); nothing if
    it is empty. A folder that cannot be made leaves the cache off, with a warning: it only
    saves time."""
    if not directory:
        return
    directory = os.path.expanduser(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        logging.warning("compilation cache off: cannot make %s (%s)", directory, error.strerror)
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    compilation_cache.reset_cache()  # JAX decides once whether to use it: decide again
