"""Finding the files of runs under a directory, through symbolic links: a folder of links to runs of several
sweeps (the usual way to compare chosen runs) reads as if the runs were in it; a link back up is walked once."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path


def files_under(directory: Path, pattern: str) -> list[Path]:
    """The files named like ``pattern`` under ``directory``, sorted, following links to directories."""
    found, seen = [], set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link to a directory already walked (a cycle, or two links to one run)
            dirs.clear()
            continue
        seen.add(real)
        found += [Path(root) / name for name in fnmatch.filter(files, pattern)]
    return sorted(found)
