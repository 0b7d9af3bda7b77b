"""The bookkeeping of a sequential run (edits that accumulate in one model).

``SequentialRun`` keeps what ``evaluate.run`` would otherwise interleave with its loop: the
original weights (restored when the run ends), the checkpoint of every update (``FactorStore``),
resuming from it bit for bit, an AlphaEdit run's running key sum, the cadences of the perplexity
and retained-efficacy measurements, and the fields each record gets (step, update, applied so
far, weights hash, ‖W‖ of the edited layers, retained efficacy).
"""

from __future__ import annotations

from dataclasses import replace

from ..editing.context import RunContext
from ..editing.null_space import NullSpace
from ..editing.weights import WeightsHandle, weights_sha
from ..errors import CromeError
from ..hooks import widen
from ..models import LoadedModel
from ..scoring.measure import generation_matches, ppl_fields, score_targets, with_prefix
from ..scoring.metrics import prob
from .checkpoint import FactorStore, replay
from .datasets import Case
from .record import CaseRecord
from .results import ResultsFile


def retained_efficacy(lm: LoadedModel, cases: list[Case], prefixes: list[str | None]) -> float:
    """Share of earlier edits whose prompt still prefers the new target (ES), each with its own prefix."""
    wins = []
    for prefix in dict.fromkeys(prefixes):
        group = [c for c, p in zip(cases, prefixes) if p == prefix]
        pairs = [(c.request.text(), t) for c in group for t in (c.request.target_new, c.request.target_true)]
        scores = score_targets(lm, pairs, prefix=prefix)
        wins += [prob(a.logprobs) > prob(b.logprobs) for a, b in zip(scores[0::2], scores[1::2])]
    return sum(wins) / len(wins) if wins else float("nan")


def retained_gen_em(lm: LoadedModel, cases: list[Case], prefixes: list[str | None]) -> float:
    """Share of earlier edits whose prompt (after its prefix) greedily generates the new target."""
    pairs = [(with_prefix(p, c.request.text()), c.request.target_new) for c, p in zip(cases, prefixes)]
    hits = generation_matches(lm, pairs)
    return sum(hits) / len(hits) if hits else float("nan")


def _entry(handle) -> dict:
    """What a memory run's checkpoint keeps of a kept edit: its number, keys and value, as computed
    (storing them again normalises them the same way)."""
    return dict(number=handle.number, **handle.edit.entry())


def spread(items: list, n: int) -> list:
    """At most ``n`` of ``items`` evenly spread from the first to the last (``n`` = 0: all of them): the
    same ones for the same count, so a retained measurement costs the same at 100 edits and at 10,000."""
    if not n or len(items) <= n:
        return list(items)
    if n == 1:
        return [items[-1]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


class SequentialRun:
    """One sequential run on ``lm``: ``resume``, then ``due``/``record`` per update, then ``close``."""

    def __init__(self, lm: LoadedModel, ctx: RunContext, results: ResultsFile):
        self.lm, self.results = lm, results
        # an AlphaEdit run's own running key sum, empty at the start (``resume`` rebuilds it)
        self.ctx = replace(ctx, null_space=ctx.null_space.fresh()) if ctx.null_space is not None else ctx
        if ctx.memory is not None:     # a memory run's own memory, empty at the start, on the model until close
            self.ctx = replace(self.ctx, memory=ctx.memory.fresh().attach(lm))
        self.layers = ctx.layers(lm.num_layers)
        self.store = FactorStore(results.path)
        self.original = WeightsHandle(lm, self.layers)
        self.applied: list[tuple[Case, str | None]] = []   # (case, its test prefix) of every kept edit
        self.updates = 0

    def close(self) -> None:
        """Give the model its original weights back (and take a memory run's memory off it)."""
        self.original.restore()
        if self.ctx.memory is not None:
            self.ctx.memory.detach()

    def sha(self) -> str:
        """The hash of the edited layers' W, and of a memory run's entries: what each record carries."""
        sha = weights_sha(self.lm, self.layers)
        return f"{sha}+{self.ctx.memory.sha()[:16]}" if self.ctx.memory is not None else sha

    def resume(self, done: list[dict], cases: list[Case]) -> list[dict]:
        """Bring the weights back to the last finished update of ``done``: the records kept.

        An update whose records were not all written (a kill between its checkpoint and its last
        record) is dropped, file and records, and runs again."""
        if not done:
            self.store.clear()
            if self.ctx.null_space is not None:
                self.store.write_null_space(self.ctx.null_space.state())
            return done
        finished = {r["case_id"] for r in done}
        saved = []   # each file read once: checked here, then replayed
        for n in self.store.updates():
            update = self.store.read(n) if n == len(saved) + 1 else None
            if update is None or not set(update["case_ids"]) <= finished:
                break
            saved.append(update)
        self.updates = len(saved)
        keep = [r for r in done if r.get("update", 0) <= self.updates]
        if len(keep) != len(done):
            self.results.rewrite(keep)
        self.store.drop_after(self.updates)
        replay(self.lm, saved)
        self._restore_null_space(saved)
        for update in saved:
            if update.get("entry"):
                entry = update["entry"]
                self.ctx.memory.add(int(entry["number"]), entry["keys"], entry["value"], entry.get("thresholds"))
        if keep and self.sha() != keep[-1].get("weights_sha"):
            raise CromeError(f"{self.results.path}: its checkpoint does not give the weights its last record saw; "
                             f"start the run anew")
        by_id = {c.case_id: c for c in cases}
        self.applied = [(by_id[r["case_id"]], r["test_prefix_text"]) for r in keep
                        if r["applied"] and r["case_id"] in by_id]
        return keep

    def _restore_null_space(self, saved: list[dict]) -> None:
        """An AlphaEdit run: its saved projections, and the running key sum rebuilt from each update's keys."""
        if self.ctx.null_space is None:
            return
        state = self.store.read_null_space()
        if state is None:
            raise CromeError(f"{self.store.null_space_path} is missing: the AlphaEdit run's checkpoint is "
                             f"incomplete; start it anew")
        null_space = NullSpace.from_state(state)
        for update in saved:
            if update.get("keys"):
                null_space.accumulate(update["keys"])
        self.ctx = replace(self.ctx, null_space=null_space)

    @staticmethod
    def due(every: int, n_done: int, size: int, last: bool) -> bool:
        """An update of ``size`` cases that ends at case ``n_done`` reaches a multiple of ``every``,
        or ends the run."""
        return n_done % every < size or last

    def record(self, evaluated: list[tuple[CaseRecord, object]], chunk: list[Case], n_done: int,
               monitor_now: bool, retain_now: bool) -> None:
        """After an update: checkpoint its factors, then fill its records' sequential fields."""
        monitor = self.ctx.monitor
        self.updates += 1
        kept = next((h for _, h in evaluated if h is not None), None)
        null_space = self.ctx.null_space
        keys = kept.keys if kept is not None and null_space is not None else {}
        memory = _entry(kept) if kept is not None and self.ctx.memory is not None else None
        self.store.write(self.updates, [c.case_id for c in chunk], kept.factors if kept is not None else {}, keys,
                         memory)
        if keys:
            null_space.accumulate(keys)
        if kept is None and monitor_now and monitor is not None:
            # nothing applied (rolled back, refused, failed): the curve still gets its point,
            # the perplexity of the model as the earlier updates left it
            fields = dict(ppl_before=monitor.baseline, **ppl_fields(monitor.baseline, monitor()))
            for rec, _ in evaluated:
                rec.set(**fields)
        sha = self.sha()
        for n, ((rec, handle), case) in enumerate(zip(evaluated, chunk)):
            if handle is not None:
                self.applied.append((case, rec.test_prefix_text))
            rec.set(step=n_done - len(chunk) + n + 1, update=self.updates, n_applied=len(self.applied),
                    weights_sha=sha, retained_efficacy=None, retained_efficacy_prefixed=None)
            if self.ctx.settings.gen_em:
                rec.set(retained_gen_em=None, retained_gen_em_prefixed=None)
        if monitor_now:
            evaluated[-1][0].weight_norms = self.weight_norms()
        if retain_now and self.applied:
            self._retained(evaluated[-1][0])

    def weight_norms(self) -> dict[str, dict]:
        """‖W_l‖_F of each edited layer now, and its ratio to the unedited ‖W_l‖_F (its growth is
        the early signal of a sequence's collapse: ENCORE)."""
        out = {}
        for layer in self.layers:
            now = float(widen(self.lm.mlp_out(layer).weight.detach()).norm())
            out[str(layer)] = dict(norm=now, ratio=now / float(widen(self.original.original[layer]).norm()))
        return out

    def _retained(self, rec: CaseRecord) -> None:
        applied = spread(self.applied, self.ctx.settings.retained_sample)
        cases = [c for c, _ in applied]
        variants = [("", [None] * len(cases))]
        if self.ctx.settings.test_prefix != "none":
            variants.append(("_prefixed", [p for _, p in applied]))
        measures = [("retained_efficacy", retained_efficacy)]
        if self.ctx.settings.gen_em:
            measures.append(("retained_gen_em", retained_gen_em))
        for name, measure in measures:
            for suffix, prefixes in variants:
                setattr(rec, name + suffix, measure(self.lm, cases, prefixes))
