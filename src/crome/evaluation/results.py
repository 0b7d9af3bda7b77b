"""Results files: one JSON line per record, appended whole and fsynced, so a killed run loses
nothing finished; ``check_resumable`` decides whether ``--resume`` may continue one. Timings go
to a ``.timing.jsonl`` beside it, so the results of a resumed run are byte-identical."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

from ..editing.context import RunSettings
from ..errors import CromeError


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
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CromeError(f"{self.path}: line {i + 1} is not JSON: not a crome results file?") from None
            if not isinstance(record, dict):
                raise CromeError(f"{self.path}: line {i + 1} is not a JSON object: not a crome results file?")
            wrong = _wrong_field(record)
            if wrong:
                raise CromeError(f"{self.path}: line {i + 1}: {wrong}: not a crome results file?")
            records.append(record)
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
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(line)
                while view:                       # a short write (a filling disk) goes on, or raises
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as e:
                os.ftruncate(fd, end)             # no partial line: the file ends at its last whole record
                raise CromeError(f"cannot write {self.path}: {e.strerror or e}; the records so far are intact: "
                                 f"rerun with --resume once there is room") from None
        finally:
            os.close(fd)


_NUM, _NONE = (int, float), type(None)
# the metric blocks of a record: after the edit (plain, prefixed, natural sentence) and before it
METRIC_GROUPS = ("metrics", "metrics_prefixed", "metrics_natural", "before", "before_prefixed", "before_natural")
# The fields that resuming, ``summarize`` and the reports compute with, and their JSON types.
FIELD_TYPES = {
    **{k: (bool,) for k in ("applied", "sequential")},
    **{k: (bool, _NONE) for k in ("collapsed", "first_token_subject")},
    "step": (int,), "seconds": _NUM,
    **{k: (*_NUM, _NONE) for k in ("fluency", "ppl_before", "ppl_after", "ppl_ratio", "guard_ppl_ratio", "denominator",
                                   "retained_efficacy", "retained_efficacy_prefixed", "retained_gen_em",
                                   "retained_gen_em_prefixed", "update_ratio")},
    **{k: (str, _NONE) for k in ("guard", "guard_action", "guard_reason", "method", "model")},
    **{k: (dict, _NONE) for k in (*METRIC_GROUPS, "weight_norms")},
}


def _wrong_field(record: dict) -> str | None:
    """The first field whose JSON type is not what crome writes (None: all fine)."""
    def ok(value, types):
        return isinstance(value, types) and not (bool not in types and isinstance(value, bool))

    for key, types in FIELD_TYPES.items():
        if key in record and not ok(record[key], types):
            return f"field {key!r} is {type(record[key]).__name__}"
    for group in METRIC_GROUPS:
        for key, value in (record.get(group) or {}).items():
            if not ok(value, (*_NUM, _NONE)):
                return f"field {group}.{key} is {type(value).__name__}"
    return None


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
CADENCE = ("monitor_every", "retained_every", "retained_sample", "scores_every")


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
        got = done[0].get(key, defaults[key])     # a field added later reads as its default
        if (tuple(got) if isinstance(got, list) else got) != value:
            raise CromeError(f"{out} holds a run with {key}={done[0].get(key)!r}, not {value!r}: "
                             f"choose another --out")
