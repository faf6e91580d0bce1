"""Resumable generated datasets: keyed rows appended to a JSON-lines file as they are computed.

A pipeline stage (pseudo inputs, teacher replies, reasons, a cheat sheet, knowledge-graph contexts) is
expensive and deterministic given its settings. Its rows live in ``<root>/<stage>-<digest>.jsonl``, the digest
taken over the settings and the producer version, so any run with the same settings (a sweep over the loss
weights) reads them instead of generating them, and a run killed mid-stage finds the rows of every finished
batch and computes only the missing keys. The rows are kept in a :class:`JsonLines` file, which a kill
mid-write cannot corrupt; contexts files that people supply (data/kg.py) are read as one too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ctxdistill import provenance
from ctxdistill.data.tasks import DataError
from ctxdistill.progress import progress_bar

log = logging.getLogger(__name__)

#: The version of the code that produces stage rows (generation and the stages' prompts and cleaning).
#: Bump it whenever that code changes what it produces: rows written by earlier code are then never read.
#: 2: generation over a shared context no longer drops the query after the first token.
#: 3: chat prompts tokenise with one BOS where the template writes one and the tokenizer adds another.
#: 4: the shared context's attention runs PyTorch's fused CPU kernel and the LM head reads a contiguous input
#: (logits equal to 1e-5, but a near-tie can pick another token).
#: 5: a contextualization writer generates with the stage's settings alone, not its generation_config.json's too.
#:    Models with attention code of their own (Bloom, Falcon, GPT-Neo, MPT, XGLM) no longer lose the context.
#:    Generation also ends on the end tokens the model's generation config lists (GenPI's replies).
PRODUCER_VERSION = 5


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class JsonLines:
    """A JSON-lines file of records that survives a kill: appends are flushed and fsynced per batch, so every
    batch that returned is on disk; reading leaves out a last line cut short by a kill mid-write (a line
    without its newline that is not a whole JSON object), and :meth:`resume` cuts it off the file so the next
    append starts on a line of its own. Any other line that is not a JSON object is an error naming it.
    Appending and resuming hold the file's lock, so that sweep cells sharing a stage never cut each other's
    batch: one that resumes while another appends would take the batch being written for a cut line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as handle:  # (creates the file, empty, if there is none)
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _split(self) -> tuple[list[dict[str, Any]], int]:
        """The records and the length of the file's sound part (without a cut last line)."""
        if not self.path.is_file():
            return [], 0
        data = self.path.read_bytes()
        records, start = [], 0
        for number, line in enumerate(data.splitlines(keepends=True), 1):
            try:
                record = json.loads(line)
            except ValueError:  # not JSON, or not UTF-8
                record = None
            if isinstance(record, dict):
                records.append(record)
            elif not line.endswith(b"\n"):
                return records, start  # the write a kill interrupted
            elif line.strip():
                raise DataError(f"{self.path}:{number}: not a JSON object; every line of a JSON-lines file holds one")
            start += len(line)
        return records, start

    def read(self) -> list[dict[str, Any]]:
        return self._split()[0]

    def resume(self) -> list[dict[str, Any]]:
        """:meth:`read`, leaving the file ready for appends: a cut last line is dropped, a whole one ended."""
        with self._locked():
            records, sound = self._split()
            size = self.path.stat().st_size
            if sound < size:
                with self.path.open("r+b") as f:
                    f.truncate(sound)
            elif size and not self.path.read_bytes().endswith(b"\n"):
                with self.path.open("ab") as f:  # a whole record whose newline the kill cut off
                    f.write(b"\n")
        return records

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        with self._locked(), self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(record) + "\n" for record in records))
            f.flush()
            os.fsync(f.fileno())


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
        self.lines = JsonLines(self.path)
        self.rows: dict[str, dict[str, Any]] = {}
        for row in self.lines.resume():
            self.rows.setdefault(row["key"], row)
        provenance.note_cache(f"stage:{stage}", name, self.path)

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        new: dict[str, dict[str, Any]] = {}
        for row in rows:
            if row["key"] not in self.rows:
                new.setdefault(row["key"], row)
        self.lines.append(list(new.values()))
        self.rows.update(new)

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
        for start in progress_bar(range(0, len(missing), batch_size), desc=desc, leave=False, disable=not missing):
            chunk = missing[start : start + batch_size]
            rows = compute(chunk)
            if [r["key"] for r in rows] != chunk:
                raise RuntimeError(f"{desc}: computed rows for {[r['key'] for r in rows]}, expected {chunk}")
            self.append(rows)
        return [self.rows[k] for k in keys]
