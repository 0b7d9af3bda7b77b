"""Results files: one JSON line per record, appended whole and fsynced, so a killed run loses
nothing finished; ``check_resumable`` decides whether ``--resume`` may continue one. Timings go
to a ``.timing.jsonl`` beside it, so the results of a resumed run are byte-identical."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

from ..errors import CromeError
from .context import RunSettings


class ResultsFile:
    """A JSONL file of records, appended one whole line per ``write`` and fsynced."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read(self) -> list[dict]:
        """Finished records; a last line cut off by a kill is dropped from the file."""
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(end)
        records = []
        for i, line in enumerate(raw[:end].splitlines()):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise CromeError(f"{self.path}: line {i + 1} is not JSON: not a crome results file?") from None
        return records

    def rewrite(self, records: list[dict]) -> None:
        """Replace the file with ``records`` (written aside, then moved into place)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(b"".join((json.dumps(json_safe(r), allow_nan=False) + "\n").encode() for r in records))
        os.replace(tmp, self.path)

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(json_safe(record), allow_nan=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def json_safe(x):
    """NaN and inf become null: the file stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x


def timing_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".timing.jsonl")


# How often a sequential run measures: a resumed run may change it (each record carries its own), since
# measuring changes no weight. A long run can thin out retained efficacy, whose cost grows with the edits.
CADENCE = ("monitor_every", "retained_every")


def check_resumable(done: list[dict], settings: RunSettings | None, out: Path, resume: bool) -> None:
    """A results file with records is continued only with ``resume`` and the same settings
    (``settings=None``: check the flag only)."""
    if not done:
        return
    if not resume:
        raise CromeError(f"{out} already holds {len(done)} results: pass --resume to continue that run, "
                         f"or choose another --out")
    if settings is None:
        return
    want = asdict(settings)
    defaults = asdict(RunSettings(method="", model="", layer=0, seed=0))
    for key, value in want.items():
        if key in CADENCE:
            continue
        if done[0].get(key, defaults[key]) != value:  # a field added later reads as its default
            raise CromeError(f"{out} holds a run with {key}={done[0].get(key)!r}, not {value!r}: "
                             f"choose another --out")
