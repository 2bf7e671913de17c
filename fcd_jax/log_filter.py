"""What the command-line entry points (``fcd_jax.main``, ``fcd_jax.ablation``) show of the logs:
fcd_jax's own lines, and other modules' warnings and errors as their message line only; the rest
(orbax's and JAX's INFO flood) only with ``--verbosity``/``-v`` (issue 15, class 9)."""

from __future__ import annotations

import logging as python_logging
import os

from absl import flags, logging

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class LibraryInfoFilter(python_logging.Filter):
    """Passes warnings and worse, and fcd_jax's own records; drops other modules' INFO, and the
    stack traces their warnings and errors carry (their message line stays: e.g. orbax's
    background threads on a full disk, which ``main`` then reports as one line)."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        if os.path.abspath(record.pathname).startswith(PACKAGE_DIR):
            return True
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return record.levelno >= python_logging.WARNING


def quiet_library_logs() -> None:
    """Without ``--verbosity``/``-v``: hides orbax's and JAX's INFO flood (issue 15, class 9)."""
    if not flags.FLAGS["verbosity"].present:
        logging.get_absl_handler().addFilter(LibraryInfoFilter())
