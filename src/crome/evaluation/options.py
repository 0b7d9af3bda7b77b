"""The rules that tie options together, in one place: ``crome edit``, ``crome eval`` (``EvalJob``)
and ``evaluate.run`` all call ``check_options``, so each rule is written (and worded) once."""

from __future__ import annotations

from ..editing.edit import METHODS
from ..editing.guard import check_guard
from ..editing.memit import BATCH_METHODS
from ..errors import CromeError

ALL_METHODS = (*METHODS, *BATCH_METHODS)


def check_options(method: str, *, mom2: bool = True, mom2_corpus: str | None = None, guard: str = "off",
                  batch_size: int = 1, edits_per_pass: int | None = None,
                  sequential: bool = False) -> None:
    """Refuse, with one line naming the options, any combination crome cannot run."""
    if method not in ALL_METHODS:
        raise CromeError(f"unknown method '{method}': choose one of {', '.join(ALL_METHODS)}")
    if not mom2 and mom2_corpus:
        raise CromeError("--no-mom2 and --mom2-corpus contradict each other")
    batch = method in BATCH_METHODS
    if batch and not mom2:
        raise CromeError("MEMIT's solve needs key statistics (C): drop --no-mom2")
    check_guard("", method, guard, rule=..., verifier=...)
    if edits_per_pass is not None and edits_per_pass < 1:
        raise CromeError("--edits-per-pass must be at least 1")
    if edits_per_pass is not None and edits_per_pass > 1 and (sequential or batch):
        raise CromeError("--edits-per-pass computes ROME edits independently: not for sequential runs or MEMIT "
                         "(whose --batch-size edits cases as one update)")
    if batch_size < 1:
        raise CromeError("--batch-size must be at least 1")
    if batch_size > 1 and not batch:
        raise CromeError("--batch-size is MEMIT's (cases as one update); ROME edits one fact at a time "
                         "(--edits-per-pass computes several at once)")
