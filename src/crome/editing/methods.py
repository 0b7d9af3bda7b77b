"""The table of methods: every fact about an editing method, in one record each.

A method is a step (how the update is computed) and a handful of facts about it:

* ``step``: ``rank_one``, ROME's closed form, one fact into one layer (``edit.py``); ``batch``,
  MEMIT's least-squares solve of several facts over several layers (``memit.py``); or ``gated``, a
  gated memory beside W that keeps each edit's keys and value, the weights untouched (``memory.py``);
* ``reads``: where the update reads the "current" key and value (ROME) or the residual stream (MEMIT):
  ``bare``, the unprefixed prompt (the reference implementations), or ``mean``, the mean over the same
  context templates as k̄ (consistent: "The Fall of ROME");
* ``needs_c``: the solve cannot run without key statistics C;
* ``null_space``: AlphaEdit's projected solve against the running sum of earlier edits' keys;
* ``guards``: the guard actions it takes (a batch is judged as a whole: off or verify);
* ``served``: offered on ``crome serve``'s page;
* ``inserts``: the keys a rank-one update writes the new value at: k̄ alone (ROME, C-ROME: u ∝ C⁻¹k̄),
  or k̄ and k^u together (``dual``: the least-C-norm direction with the same denominator at both, so
  the edit takes on the bare prompt and after a prefix without mixing the two in one formula).

Every edit's efficacy is checked on the bare prompt, where users look; a consistent method's edit is
learned for prefixed contexts, so it is checked after the test-time prefix as well (``test_places``).
Adding a method is one entry here plus its step file.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CromeError

STEPS = ("rank_one", "batch", "gated")
GUARD_ACTIONS = ("off", "refuse", "verify", "fallback")


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    step: str
    reads: str
    needs_c: bool
    null_space: bool = False
    served: bool = False
    inserts: tuple[str, ...] = ("k_mean",)

    @property
    def batch(self) -> bool:
        """Several facts as one update over several layers (MEMIT's step)."""
        return self.step == "batch"

    @property
    def gated(self) -> bool:
        """Its edits live in a gated memory beside W (``memory.py``), the weights untouched."""
        return self.step == "gated"

    @property
    def in_place(self) -> bool:
        """Its edits are measured where they are (in W, or in the memory), not as activation overlays."""
        return self.step != "rank_one"

    @property
    def consistent(self) -> bool:
        return self.reads == "mean"

    @property
    def test_places(self) -> tuple[str, ...]:
        """Where the guard checks that an edit took: the bare prompt, where users look; and after the
        test-time prefix for an edit learned for prefixed contexts (consistent) or written at both keys."""
        return ("bare", "prefix") if self.consistent or "k_bare" in self.inserts else ("bare",)

    @property
    def current_key(self) -> tuple[str, str]:
        """The ``Keys`` fields ROME's update takes as k_cur and v_cur."""
        return f"k_{self.reads}", f"v_{self.reads}"

    @property
    def guards(self) -> tuple[str, ...]:
        return ("off", "verify") if self.in_place else GUARD_ACTIONS

    def require_stats(self, missing: list[int] | None = None) -> None:
        """The one rule for a method whose solve needs C and has none (at ``missing`` layers)."""
        where = f" at layers {missing}" if missing else ""
        raise CromeError(f"{self.label}'s solve needs key statistics (C){where}: drop --no-mom2")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("rome", "ROME", "rank_one", "bare", needs_c=False, served=True),
    Method("crome", "C-ROME", "rank_one", "mean", needs_c=False, served=True),
    Method("dual", "Dual-key C-ROME", "rank_one", "bare", needs_c=False, served=True, inserts=("k_mean", "k_bare")),
    Method("memit", "MEMIT", "batch", "bare", needs_c=True, served=True),
    Method("cmemit", "C-MEMIT", "batch", "mean", needs_c=True, served=True),
    Method("alphaedit", "AlphaEdit", "batch", "bare", needs_c=True, null_space=True),
    Method("calphaedit", "C-AlphaEdit", "batch", "mean", needs_c=True, null_space=True),
    Method("memory", "Gated memory", "gated", "mean", needs_c=True, served=True),
)}
# the default (issue 38): consistent like C-ROME, and it takes on the bare prompt too (docs/EVAL.md, "Where users look")
DEFAULT_METHOD = "dual"
DEFAULT_BATCH_METHOD = "cmemit"
# the method the guard falls back to, and the one trial edits of ``--layer auto`` make: consistent, one fact
FALLBACK_METHOD = "crome"
# what to try when an edit did not take on the bare prompt: it writes the bare prompt's key as well as k̄
BARE_KEY_METHOD = "dual"
# ``crome demo``: the reference, its consistent fix, and the default, side by side
DEMO_METHODS = ("rome", "crome", "dual")
# the reference implementation (bare keys): the method whose first-token collapse ``crome analyze
# first-token`` edits again with random text before the subject
REFERENCE_METHOD = "rome"
SINGLE_METHODS = tuple(m.name for m in METHODS.values() if not m.batch)
BATCH_METHODS = tuple(m.name for m in METHODS.values() if m.batch)


def method(name: str | Method, step: str | None = None) -> Method:
    """The table's entry for ``name`` (with ``step``: only a method of that step), or one line naming
    the choices."""
    m = name if isinstance(name, Method) else METHODS.get(name) if isinstance(name, str) else None
    if m is None or (step is not None and m.step != step):
        names = [x for x, v in METHODS.items() if step is None or v.step == step]
        kind = "batch " if step == "batch" else ""
        raise CromeError(f"unknown {kind}method '{getattr(name, 'name', name)}': choose one of {', '.join(names)}")
    return m
