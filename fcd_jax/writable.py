"""Whether an output folder can be made and written: checked before any work, so that a run
never scores or converts everything only to fail at its first write."""

from __future__ import annotations

import os
from pathlib import Path


def unwritable_reason(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` (existing or to be made) cannot take new files, or None if it can: it, or
    the nearest of its parents that exists, is a file, or not writable (a read-only disk, no
    permission)."""
    folder = Path(os.path.abspath(os.path.expanduser(os.fspath(folder))))
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):  # EROFS counts, even for root
        return f"{existing} is not writable"
    return None
