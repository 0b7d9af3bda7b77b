"""The rules that tie options together, in one place: ``crome edit``, ``crome eval`` (``EvalJob``)
and ``evaluate.run`` all call ``check_options``, so each rule is written (and worded) once; and the
one rule for how many cases are edited together (``cases_per_chunk``)."""

from __future__ import annotations

from ..editing.guard import check_guard
from ..editing.methods import BATCH_METHODS, Method, method
from ..errors import CromeError

# --edits-per-pass by device, chosen by measurement (docs/SPEED.md, benchmarks/bench_eval.py): on the
# 2-core CPU K = 2 ran 1.15x the cases per minute of K = 1 at 1.78 GiB peak; K = 4 ran 1.18x but
# needed 2.14 GiB, over the 2 GB budget. No GPU was measured: 1 until one is.
DEFAULT_EDITS_PER_PASS = {"cpu": 2}


def default_edits_per_pass(device_type: str) -> int:
    return DEFAULT_EDITS_PER_PASS.get(device_type, 1)


def cases_per_chunk(m: Method, batch_size: int, edits_per_pass: int) -> int:
    """Cases handled together: a batch method's update of ``batch_size`` cases, one at a time for a method
    measured in place (the memory), else K edits per pass."""
    return batch_size if m.batch else 1 if m.in_place else edits_per_pass


def check_options(name: str, *, mom2: bool = True, mom2_corpus: str | None = None, guard: str = "off",
                  batch_size: int = 1, edits_per_pass: int | None = None,
                  sequential: bool = False, hparams: dict | None = None) -> None:
    """Refuse, with one line naming the options, any combination crome cannot run (``hparams``:
    the hyper-parameters the user overrides)."""
    m = method(name)
    if not mom2 and mom2_corpus:
        raise CromeError("--no-mom2 and --mom2-corpus contradict each other")
    if m.needs_c and not mom2:
        m.require_stats()
    check_guard("", m, guard, rule=..., verifier=...)
    _check_sizes(m, batch_size, edits_per_pass, sequential)
    _check_hparams(m, hparams or {})


def _check_sizes(m: Method, batch_size: int, edits_per_pass: int | None, sequential: bool) -> None:
    if edits_per_pass is not None and edits_per_pass < 1:
        raise CromeError("--edits-per-pass must be at least 1")
    if edits_per_pass is not None and edits_per_pass > 1 and (sequential or m.in_place):
        raise CromeError("--edits-per-pass computes ROME edits independently: not for sequential runs or MEMIT "
                         "(whose --batch-size edits cases as one update)")
    if batch_size < 1:
        raise CromeError("--batch-size must be at least 1")
    if batch_size > 1 and not m.batch:
        raise CromeError("--batch-size is MEMIT's (cases as one update); ROME edits one fact at a time "
                         "(--edits-per-pass computes several at once)")


def _check_hparams(m: Method, given: dict) -> None:
    if given.get("norm_weight") and not m.batch:
        raise CromeError("--norm-weight bounds the batch solves (MEMIT, AlphaEdit); ROME's closed form has none: "
                         "use --method " + " or ".join(BATCH_METHODS))
    if given.get("nas") and not m.batch:
        raise CromeError("--nas rescales the batch step's value vectors (MEMIT, AlphaEdit): use --method "
                         + " or ".join(BATCH_METHODS))
    if given.get("nas_trials", 1) < 1 or given.get("nas_skip", 2.0) <= 1:
        raise CromeError("--nas needs at least one trial edit and a skip ratio above 1")
    if given.get("norm_weight", 0) < 0:
        raise CromeError("--norm-weight must be at least 0")
    for name in ("null_space_energy", "alphaedit_l2"):
        if name in given and not m.null_space:
            nulls = " or ".join(x.name for x in map(method, BATCH_METHODS) if x.null_space)
            raise CromeError(f"--{name.replace('_', '-')} is AlphaEdit's: use --method {nulls}")
    if "null_space_energy" in given and not 0 < given["null_space_energy"] < 1:
        raise CromeError("--null-space-energy must be in (0, 1)")
    if given.get("alphaedit_l2", 1) <= 0:
        raise CromeError("--alphaedit-l2 must be positive")
