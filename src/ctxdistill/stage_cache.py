"""Resumable generated datasets: keyed rows appended to a JSON-lines file as they are computed.

A pipeline stage (pseudo inputs, teacher replies, reasons) is expensive and deterministic
given its settings. Its rows live in ``<root>/<stage>-<digest>.jsonl``, the digest taken over the
settings and the producer version, so any run with the same settings (a sweep over the loss
weights) reads them instead of generating them, and a run killed mid-stage finds the rows of
every finished batch and computes only the missing keys. A line cut short by the kill is dropped on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from ctxdistill import provenance

log = logging.getLogger(__name__)

#: The version of the code that produces stage rows (generation and the stages' prompts and cleaning).
#: Bump it whenever that code changes what it produces: rows written by earlier code are then never read.
#: 2: generation over a shared context no longer drops the query after the first token.
#: 3: chat prompts tokenise with one BOS where the template writes one and the tokenizer adds another.
PRODUCER_VERSION = 3


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class RowStore:
    """Rows ``{"key": ..., ...}`` of one stage, one per key, in a file named by the stage's settings."""

    def __init__(self, root: str | Path, stage: str, settings: dict[str, Any]):
        root = Path(root).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        settings = {**settings, "producer_version": PRODUCER_VERSION}
        name = f"{stage}-{digest(settings)}"
        self.path = root / f"{name}.jsonl"
        settings_file = root / f"{name}.settings.json"  # for people: what produced the rows
        if not settings_file.is_file():
            settings_file.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        self.rows: dict[str, dict[str, Any]] = {}
        self._load()
        provenance.note_cache(f"stage:{stage}", name, self.path)

    def _load(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):  # the last write was killed: drop its partial line
            with self.path.open("r+b") as f:
                f.truncate(len(complete))
        for line in complete.decode("utf-8").splitlines():
            row = json.loads(line)
            self.rows.setdefault(row["key"], row)

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            for row in rows:
                if row["key"] not in self.rows:
                    f.write(json.dumps(row) + "\n")
                    self.rows[row["key"]] = row
            f.flush()
            os.fsync(f.fileno())

    def fill(
        self, keys: Sequence[str], compute: Callable[[list[str]], list[dict[str, Any]]], batch_size: int, desc: str
    ) -> list[dict[str, Any]]:
        """The rows of ``keys`` in order; missing ones are computed ``batch_size`` at a time and saved per batch."""
        missing = [k for k in dict.fromkeys(keys) if k not in self.rows]
        if missing and len(missing) < len(keys):
            log.info(
                "%s: %d of %d rows found in %s, generating the rest",
                desc,
                len(keys) - len(missing),
                len(keys),
                self.path,
            )
        for start in tqdm(range(0, len(missing), batch_size), desc=desc, leave=False, disable=not missing):
            chunk = missing[start : start + batch_size]
            rows = compute(chunk)
            if [r["key"] for r in rows] != chunk:
                raise RuntimeError(f"{desc}: computed rows for {[r['key'] for r in rows]}, expected {chunk}")
            self.append(rows)
        return [self.rows[k] for k in keys]
