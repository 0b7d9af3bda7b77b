"""Text sets: ME-PPL JSON ([{"Corpus", "Text"}]), Wikipedia summaries, or plain text.

The default perplexity set ships with crome: ``corpus/english_passages.txt``,
short passages of plain English prose written for this project (CC0).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from ..errors import CromeError

DEFAULT_CORPUS = "english_passages.txt"


def corpus_path(name: str) -> Path:
    """A file that ships with crome in its ``corpus`` folder."""
    return Path(str(resources.files(__name__.split(".")[0]) / "corpus" / name))


def default_corpus_path() -> Path:
    return corpus_path(DEFAULT_CORPUS)


def perplexity_source(path: str | Path | None = None) -> Path:
    """The perplexity texts' file: ``path``, else $CROME_PPL_DATA, else the bundled corpus."""
    given = path or os.environ.get("CROME_PPL_DATA")
    return Path(given) if given else default_corpus_path()


def load_texts(path: str | Path | None = None) -> list[str]:
    """Passages from ``path`` (default: the bundled corpus)."""
    path = Path(path) if path is not None else default_corpus_path()
    if not path.exists():
        raise CromeError(f"text file not found: {path}")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CromeError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        texts = _texts_from_json(data, path)
    else:
        texts = [line.strip() for line in raw.splitlines() if line.strip()]
    if not texts:
        raise CromeError(f"{path}: no texts")
    return texts


def _texts_from_json(data, path: Path) -> list[str]:
    if isinstance(data, list):
        texts = []
        for i, rec in enumerate(data):
            if isinstance(rec, str):
                texts.append(rec)
            elif isinstance(rec, dict) and isinstance(rec.get("Text"), str):
                texts.append(rec["Text"])
            else:
                raise CromeError(f"{path}: record {i}: expected a string or an object with a 'Text' string")
        return [t.strip() for t in texts if t.strip()]
    if isinstance(data, dict):  # {title: {extract: ...}} (Wikipedia summaries)
        texts = []
        for title, rec in data.items():
            text = rec.get("extract") if isinstance(rec, dict) else rec
            if not isinstance(text, str):
                raise CromeError(f"{path}: record {title!r}: no 'extract' text")
            if text.strip():
                texts.append(text.strip())
        return texts
    raise CromeError(f"{path}: expected a JSON list of texts or an object of articles")
