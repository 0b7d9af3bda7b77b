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
                  sequential: bool = False, hparams: dict | None = None) -> None:
    """Refuse, with one line naming the options, any combination crome cannot run (``hparams``:
    the hyper-parameters the user overrides)."""
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
    given = hparams or {}
    if given.get("norm_weight") and not batch:
        raise CromeError("--norm-weight bounds the batch solves (MEMIT, AlphaEdit); ROME's closed form has none: "
                         "use --method " + " or ".join(BATCH_METHODS))
    if given.get("norm_weight", 0) < 0:
        raise CromeError("--norm-weight must be at least 0")
    null_space = batch and BATCH_METHODS[method].null_space
    for name in ("null_space_energy", "alphaedit_l2"):
        if name in given and not null_space:
            raise CromeError(f"--{name.replace('_', '-')} is AlphaEdit's: use --method alphaedit or calphaedit")
    if "null_space_energy" in given and not 0 < given["null_space_energy"] < 1:
        raise CromeError("--null-space-energy must be in (0, 1)")
    if given.get("alphaedit_l2", 1) <= 0:
        raise CromeError("--alphaedit-l2 must be positive")
    if batch_size > 1 and not batch:
        raise CromeError("--batch-size is MEMIT's (cases as one update); ROME edits one fact at a time "
                         "(--edits-per-pass computes several at once)")
