"""Evaluation cases from CounterFact (flat and full schema) and zsRE (MEND form).

Every record becomes a ``Case``: the edit request plus the prompts its metrics
are measured on. The format is recognised per record:

* CounterFact, full schema (ROME's release): ``requested_rewrite`` with a "{}"
  prompt, ``paraphrase_prompts``, ``neighborhood_prompts``,
  ``attribute_prompts``, ``generation_prompts``;
* CounterFact, flat (EasyEdit, "Fall of ROME" code): ``prompt`` holding the
  subject literally, ``target_new``, ``ground_truth``, ``rephrase_prompt``,
  ``locality_prompt``, ``locality_ground_truth``;
* zsRE, MEND form: ``src``, ``subject``, ``alt`` (new), ``answers``/``pred``
  (true), ``rephrase``, ``loc``, ``loc_ans``.

A malformed record raises ``CromeError`` naming the file, the record index and
the field; with ``skip_invalid`` it is counted in ``Dataset.skipped`` instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import CromeError
from ..request import EditRequest

DATA_ENV = "CROME_DATA"


@dataclass
class Case:
    case_id: str
    request: EditRequest
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)   # the old fact should still hold here
    neighborhood_target: str = ""                                   # ... with this answer
    generation_prompts: list[str] = field(default_factory=list)
    attribute_prompts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["request"] = self.request.to_dict()
        return d


@dataclass
class Dataset:
    path: str
    cases: list[Case]
    skipped: list[str]  # one line per skipped record: index and reason


class _Bad(Exception):
    """A record's problem, named by field."""


def _str(rec: dict, key: str, *, nested: str | None = None) -> str:
    src = rec
    if nested is not None:
        src = rec.get(nested)
        if not isinstance(src, dict):
            raise _Bad(f"field '{nested}' is missing or not an object")
    value = src.get(key)
    name = f"{nested}.{key}" if nested else key
    if isinstance(value, dict) and "str" in value:  # CounterFact's {"str", "id"} targets
        value = value["str"]
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"field '{name}' is missing or empty")
    return value


def _strs(rec: dict, key: str, required: bool = False) -> list[str]:
    value = rec.get(key)
    if value is None and not required:
        return []
    if isinstance(value, str):
        value = [value]
    strings = isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)
    if not strings or (required and not value):
        raise _Bad(f"field '{key}' must be a list of non-empty strings")
    return value


def _full(rec: dict, index: int) -> Case:
    rw = rec.get("requested_rewrite")
    subject = _str(rec, "subject", nested="requested_rewrite")
    prompt = _str(rec, "prompt", nested="requested_rewrite")
    target_true = _str(rw, "target_true")
    request = _request(prompt, subject, _str(rw, "target_new"), target_true)
    return Case(case_id=str(rec.get("case_id", index)), request=request,
                paraphrase_prompts=_strs(rec, "paraphrase_prompts"),
                neighborhood_prompts=_strs(rec, "neighborhood_prompts"), neighborhood_target=target_true,
                generation_prompts=_strs(rec, "generation_prompts"),
                attribute_prompts=_strs(rec, "attribute_prompts"))


def _flat(rec: dict, index: int) -> Case:
    request = _request(_str(rec, "prompt"), _str(rec, "subject"), _str(rec, "target_new"),
                       _str(rec, "ground_truth"))
    loc = _strs(rec, "locality_prompt")
    return Case(case_id=str(rec.get("case_id", index)), request=request,
                paraphrase_prompts=_strs(rec, "rephrase_prompt"), neighborhood_prompts=loc,
                neighborhood_target=_str(rec, "locality_ground_truth") if loc else "")


def _zsre(rec: dict, index: int) -> Case:
    answers = rec.get("answers")
    true = answers[0] if isinstance(answers, list) and answers and isinstance(answers[0], str) else rec.get("pred")
    if not isinstance(true, str) or not true.strip():
        raise _Bad("field 'answers' is missing or empty")
    request = _request(_str(rec, "src"), _str(rec, "subject"), _str(rec, "alt"), true)
    loc = _strs(rec, "loc")
    return Case(case_id=str(rec.get("case_id", index)), request=request,
                paraphrase_prompts=_strs(rec, "rephrase"), neighborhood_prompts=loc,
                neighborhood_target=_str(rec, "loc_ans") if loc else "")


def _request(prompt: str, subject: str, target_new: str, target_true: str) -> EditRequest:
    try:
        return EditRequest.create(prompt, subject, target_new, target_true)
    except CromeError as e:
        raise _Bad(str(e)) from None


def _parse(rec, index: int) -> Case:
    if not isinstance(rec, dict):
        raise _Bad("record is not a JSON object")
    if "requested_rewrite" in rec:
        return _full(rec, index)
    if "src" in rec and "alt" in rec:
        return _zsre(rec, index)
    if "prompt" in rec:
        return _flat(rec, index)
    raise _Bad("unknown record format: expected 'requested_rewrite' (CounterFact), "
               "'prompt' (flat CounterFact) or 'src'/'alt' (zsRE)")


def resolve(path: str | os.PathLike) -> Path:
    """A data path as given, else relative to $CROME_DATA."""
    p = Path(path)
    if p.exists():
        return p
    root = os.environ.get(DATA_ENV)
    if root and (Path(root) / p).exists():
        return Path(root) / p
    hint = f" (nor under ${DATA_ENV}={root})" if root else f" (set ${DATA_ENV} to a data folder to use relative names)"
    raise CromeError(f"data file not found: {path}{hint}")


def load_cases(path: str | os.PathLike, skip_invalid: bool = False) -> Dataset:
    p = resolve(path)
    try:
        records = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CromeError(f"{p}: not a readable JSON file ({e})") from None
    if not isinstance(records, list):
        raise CromeError(f"{p}: expected a JSON list of records")
    cases, skipped, seen = [], [], set()
    for i, rec in enumerate(records):
        try:
            case = _parse(rec, i)
            if case.case_id in seen:
                raise _Bad(f"duplicate case_id {case.case_id}")
        except _Bad as e:
            if not skip_invalid:
                raise CromeError(f"{p}: record {i}: {e}") from None
            skipped.append(f"record {i}: {e}")
            continue
        seen.add(case.case_id)
        cases.append(case)
    return Dataset(path=str(p), cases=cases, skipped=skipped)


def select(dataset: Dataset, n: int | None = None, case_ids: list[str] | None = None) -> list[Case]:
    """The first ``n`` cases, or the cases with the given ids (in the order given)."""
    if case_ids:
        by_id = {c.case_id: c for c in dataset.cases}
        missing = [c for c in case_ids if c not in by_id]
        if missing:
            raise CromeError(f"{dataset.path}: no case with id {', '.join(missing[:5])}")
        return [by_id[c] for c in case_ids]
    return dataset.cases[:n] if n is not None else list(dataset.cases)


@dataclass
class KnownFact:
    prompt: str
    subject: str
    answer: str


def load_knowns(path: str | os.PathLike) -> list[KnownFact]:
    """ROME's known facts (known_1000.json: subject, prompt, attribute)."""
    p = resolve(path)
    try:
        records = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CromeError(f"{p}: not a readable JSON file ({e})") from None
    facts = []
    for i, rec in enumerate(records if isinstance(records, list) else []):
        try:
            facts.append(KnownFact(_str(rec, "prompt"), _str(rec, "subject"), _str(rec, "attribute")))
        except _Bad as e:
            raise CromeError(f"{p}: record {i}: {e}") from None
        except AttributeError:
            raise CromeError(f"{p}: record {i}: record is not a JSON object") from None
    if not facts:
        raise CromeError(f"{p}: expected a JSON list of known facts")
    return facts
