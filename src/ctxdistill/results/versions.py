"""The library and code versions behind a set of runs, for a sweep's README (read from each run's
``provenance`` record, which :mod:`ctxdistill.provenance` writes)."""

from __future__ import annotations

from typing import Any, Iterable, Optional


def version_line(versions: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value}" for name, value in versions.items())


def run_versions(record: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The versions a run record carries, its code's commit among them (None: made before runs recorded them)."""
    provenance = record.get("provenance")
    if not provenance:
        return None
    code = provenance["code"]
    commit = (code["commit"][:12] + (" (dirty)" if code["dirty"] else "")) if code["commit"] else "not a git checkout"
    return {**provenance["versions"], "commit": commit}


def versions_markdown(records: Iterable[dict[str, Any]]) -> list[str]:
    """Markdown lines for a sweep's README: the versions every run shares, and a table of the runs whose
    versions differ (only the differing columns), so a reader sees at once whether a comparison mixes
    library versions or code."""
    records = list(records)
    versions = [run_versions(r) for r in records]
    known = [(r, v) for r, v in zip(records, versions) if v is not None]
    lines = []
    if known:
        names = list(dict.fromkeys(name for _, v in known for name in v))
        differing = [name for name in names if len({v.get(name) for _, v in known}) > 1]
        shared = {name: known[0][1].get(name) for name in names if name not in differing}
        lines.append(f"**Versions** (shared by all {len(known)} runs that record them): {version_line(shared)}")
        if differing:
            lines += [
                "",
                f"**Versions differ** between runs ({', '.join(differing)}):",
                "",
                "| method | model | dataset | seed | " + " | ".join(differing) + " |",
                "|" + " --- |" * (4 + len(differing)),
            ]
            for record, version in sorted(known, key=lambda rv: [str(rv[1].get(n)) for n in differing]):
                cell = [record.get(k) for k in ("method", "model", "dataset", "seed")]
                lines.append("| " + " | ".join(str(x) for x in [*cell, *(version.get(n) for n in differing)]) + " |")
    missing = len(records) - len(known)
    if missing:
        lines += ["", f"{missing} run(s) record no versions (made before runs recorded their provenance)."]
    return lines
