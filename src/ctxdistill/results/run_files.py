"""Finding the files of runs under a directory, through symbolic links: a folder of links to runs of several
sweeps (the usual way to compare chosen runs) reads as if the runs were in it. A link into the walked tree (W&B's
``wandb/latest-run``, a link back up) is a second name for what the walk reaches anyway, and is not followed."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path


def files_under(directory: Path, pattern: str) -> list[Path]:
    """The files named like ``pattern`` under ``directory``, sorted, following links that lead out of it."""
    top = os.path.realpath(directory)
    found, seen = [], set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # two links to one directory outside (a run linked twice)
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not _links_into(os.path.join(root, d), top)]
        found += [Path(root) / name for name in fnmatch.filter(files, pattern)]
    return sorted(found)


def _links_into(path: str, top: str) -> bool:
    if not os.path.islink(path):
        return False
    target = os.path.realpath(path)
    return target == top or target.startswith(top + os.sep)
