"""One loaded model, edited from several browsers: ``crome serve``'s state, without the page.

``EditSession`` keeps the base W of every layer an edit has touched and the applied edits' factors
in order. Its invariant: the edited layers' W equal the base plus the applied edits' factors, added
in order (``weights.replay``), and the gated memory (when the memory method was used) holds exactly
the applied memory edits' entries. It holds after an edit, after undoing *any* edit, and in a fresh
process that applies the exported delta file (``editing/delta.py``), so all three give the same bits.

One lock serialises everything that touches the weights: an edit, an undo, an export, and each
answer of Ask (which swaps in the base weights for the unedited answer). Nothing ever sees a
half-applied edit, and a second user's edit waits for the first. Every input is checked before
the lock is taken, with the CLI's one-line errors; a refused or failed edit leaves the weights as
they were.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from ..editing import methods as table
from ..editing import weights
from ..editing.delta import DeltaEdit, fingerprint, write_delta
from ..editing.memory import MEMORY_FILE
from ..editing.records import GuardRefused
from ..errors import CromeError
from ..request import EditRequest, requests_from_input
from ..scoring.measure import generate
from ..scoring.readings import chat_text
from .explain import explain_diagnostics, explain_refusal

# Bounds on what a page may send (characters; requests in one MEMIT list; tokens).
MAX_TEXT, MAX_PROMPT, MAX_REQUESTS, MAX_TOKENS = 200, 500, 20, 100
ASK_THROUGH = ("typed", "chat")   # Ask: the prompt as typed, or through the model's chat template
# The page's choices: the table's served methods, the default first; the guard actions they take,
# verify (the page's default) first, without fallback (the page applies the method it names or nothing).
SERVED = tuple(m for m in table.METHODS.values() if m.served)
METHODS = tuple(sorted((m.name for m in SERVED), key=lambda name: name != table.DEFAULT_METHOD))
GUARDS = tuple(sorted((g for g in table.GUARD_ACTIONS if g != "fallback" and any(g in m.guards for m in SERVED)),
                      key=lambda g: g != "verify"))


def bounded(name: str, text: str | None, limit: int) -> str:
    """``text`` (None: ""), or a one-line error when it is longer than ``limit``."""
    text = "" if text is None else str(text)
    if len(text) > limit:
        raise CromeError(f"the {name} is {len(text)} characters; at most {limit}")
    return text


def choice(method: str, guard: str) -> table.Method:
    """The table's entry for the page's ``method``, checked with ``guard`` (one line for a bad pair)."""
    m = table.method(method)
    if m.name not in METHODS:
        raise CromeError(f"{m.label} is not offered here: choose one of {', '.join(METHODS)}")
    if guard not in GUARDS:
        raise CromeError(f"unknown guard '{guard}': choose {', '.join(GUARDS)}")
    if guard not in m.guards:
        raise CromeError(f"{m.label} takes the guard {' or '.join(g for g in GUARDS if g in m.guards)}")
    return m


@dataclass
class Applied:
    """An edit in the history: its number (kept through undos), factors and report."""

    number: int
    delta: DeltaEdit
    report: dict
    diagnostics: list[str]
    ppl_after: float | None


@dataclass
class EditOutcome:
    """What the page shows after an edit: applied or why not, the report, generations, perplexity."""

    applied: bool
    message: str                        # one line for a non-specialist
    report: dict | None = None
    diagnostics: list[str] = field(default_factory=list)
    generations: list[tuple[str, str, str]] = field(default_factory=list)   # (prompt, before, after)
    ppl_before: float | None = None
    ppl_after: float | None = None
    number: int | None = None


class EditSession:
    """The model, the base weights of the touched layers, the applied edits, one lock."""

    def __init__(self, lm, job, texts: list[str] | None = None, gen_tokens: int = 20, status=None):
        from ..evaluation.jobs import quiet

        self.lm, self.job, self.texts, self.gen_tokens = lm, job, texts, gen_tokens
        self.status = status or quiet
        self.lock = threading.RLock()
        self.base: dict[int, torch.Tensor] = {}
        self.applied: list[Applied] = []
        self.events: list[dict] = []       # the monitor's timeline: every edit and undo, perplexity after
        self._prepared: dict[str, object] = {}
        self._contexts: dict[tuple[str, str], object] = {}
        self._numbers = 0
        self._fingerprint: dict | None = None
        self.ppl_base = None
        if texts:
            self.ppl_base = self.context(table.DEFAULT_METHOD, "off").monitor.baseline

    # ------------------------------------------------------------ weights
    def _snapshot(self, layers) -> None:
        """Keep the base W of ``layers`` not yet kept (untouched until now, so still the base)."""
        for layer in layers:
            if layer not in self.base:
                self.base[layer] = self.lm.mlp_out(layer).weight.detach().clone()

    def _rebuild(self, edits: list[Applied] | None = None) -> None:
        """W = base + the factors of ``edits`` (default: the applied ones), added in order; the memory
        holds their memory entries, numbered as the history numbers them."""
        edits = self.applied if edits is None else edits
        with torch.no_grad():
            for layer, w in self.base.items():
                self.lm.mlp_out(layer).weight.copy_(w)
        weights.replay(self.lm, (e.delta.factors for e in edits))
        memory = self.memory()
        if memory is not None:
            for number in list(memory.numbers):
                memory.remove(number)
            for e in edits:
                if e.delta.entry is not None:
                    memory.add(e.number, e.delta.entry["keys"], e.delta.entry["value"], e.delta.entry["thresholds"])

    def memory(self):
        """The session's gated memory (on the model since the memory method was first used), or None."""
        return next((ctx.memory for ctx in self._prepared.values() if ctx.memory is not None), None)

    @contextmanager
    def unedited(self):
        """The base weights for the duration (under the lock), the edits back afterwards."""
        with self.lock:
            self._rebuild([])
            try:
                yield self.lm
            finally:
                self._rebuild()

    def context(self, method: str, guard: str):
        """The run context of ``method`` with ``guard`` (built once, on the base weights: the
        monitor's and the guard's baselines are the unedited model)."""
        from ..evaluation.jobs import prepare, with_checks

        choice(method, guard)
        with self.lock:
            if (method, guard) not in self._contexts:
                job = replace(self.job, method=method, guard=guard)
                with self.unedited():
                    if method not in self._prepared:
                        self._prepared[method] = prepare(self.lm, job, status=self.status, texts=self.texts)
                    ctx = with_checks(self.lm, self._prepared[method], job, status=self.status)
                threshold = job.guard_threshold if guard == "verify" else None
                ctx = replace(ctx, settings=replace(ctx.settings, guard=guard, guard_threshold=threshold))
                self._snapshot(ctx.layers(self.lm.num_layers))
                self._contexts[(method, guard)] = ctx
            return self._contexts[(method, guard)]

    def perplexity(self) -> float | None:
        """Perplexity of the model as it is now (None without perplexity texts)."""
        if not self.texts:
            return None
        with self.lock:
            monitor = self.context(table.DEFAULT_METHOD, "off").monitor
            return monitor.at(min(self.base))() if self.base else monitor.baseline

    # ------------------------------------------------------------ edit, undo
    def requests(self, prompt: str, subject: str, target: str, method: str, batch: str = "") -> list[EditRequest]:
        """The page's fields as requests (one line of error for a bad one), before any lock: the list of
        facts for a batch method when there is one, else the fact's fields (``requests_from_input``)."""
        batch_method = table.method(method).batch
        if batch_method and batch and batch.strip():
            requests = requests_from_input(batch=True, source="the list of facts",
                                           listed=bounded("list of facts", batch,
                                                          MAX_REQUESTS * (MAX_PROMPT + 3 * MAX_TEXT)))
            if len(requests) > MAX_REQUESTS:
                raise CromeError(f"{len(requests)} facts in one update; at most {MAX_REQUESTS}")
            return requests
        return requests_from_input(bounded("prompt", prompt, MAX_PROMPT), bounded("subject", subject, MAX_TEXT),
                                   bounded("new target", target, MAX_TEXT), batch=batch_method)

    def edit(self, prompt: str = "", subject: str = "", target: str = "", method: str = table.DEFAULT_METHOD,
             guard: str = "verify", batch: str = "") -> EditOutcome:
        """Compute, judge and apply one edit (or one MEMIT list); the history keeps it."""
        from ..evaluation.report import edit_and_report

        choice(method, guard)
        requests = self.requests(prompt, subject, target, method, batch)
        with self.lock:
            ctx = self.context(method, guard)
            ppl_before = self.perplexity()
            before = [generate(self.lm, r.text(), self.gen_tokens) for r in requests[:3]]
            try:
                report, edit = edit_and_report(self.lm, requests, ctx, ppl_data=self.job.ppl_data, keep=True,
                                               generate_tokens=self.gen_tokens)
            except GuardRefused as refused:
                self._rebuild()
                return EditOutcome(False, explain_refusal(refused, requests[0]), ppl_before=ppl_before,
                                   diagnostics=explain_diagnostics(getattr(refused.edit, "diagnostics", None)))
            except BaseException:
                self._rebuild()
                raise
            if not report.applied:
                self._rebuild()
                return EditOutcome(False, "The update came out as NaN or infinity, so it was not applied; the "
                                          "model is unchanged.", report=report.to_dict(), ppl_before=ppl_before)
            self._numbers += 1
            record = report.to_dict()
            entry = edit.entry() if ctx.method.gated else None
            delta = DeltaEdit([r.to_dict() for r in requests], method, weights.on_cpu(edit.factors),
                              _provenance(record), entry)
            applied = Applied(self._numbers, delta, record,
                              explain_diagnostics(getattr(edit, "diagnostics", None)), None)
            self.applied.append(applied)
            self._rebuild()
            applied.ppl_after = self.perplexity()
            after = [generate(self.lm, r.text(), self.gen_tokens) for r in requests[:3]]
            self.events.append(dict(event=f"edit {applied.number}", ppl=applied.ppl_after, time=time.time()))
            return EditOutcome(True, _applied_message(record), record, applied.diagnostics,
                               [(r.text(), b, a) for r, b, a in zip(requests, before, after)],
                               ppl_before, applied.ppl_after, applied.number)

    def undo(self, number: int) -> float | None:
        """Take back edit ``number`` (any of them): the weights become the base plus the other
        edits' factors in order. Returns the perplexity after."""
        with self.lock:
            keep = [e for e in self.applied if e.number != number]
            if len(keep) == len(self.applied):
                numbers = ", ".join(str(e.number) for e in self.applied) or "none"
                raise CromeError(f"no edit number {number} in the history (edits: {numbers})")
            self.applied = keep
            self._rebuild()
            ppl = self.perplexity()
            self.events.append(dict(event=f"undo {number}", ppl=ppl, time=time.time()))
            return ppl

    def history(self) -> list[dict]:
        """The applied edits in order, as the page's table rows."""
        with self.lock:
            return [dict(number=e.number, method=e.delta.method,
                         layers=sorted(e.delta.factors) or e.report.get("layers"),
                         facts="; ".join(f"{r['prompt'].replace('{}', r['subject'])} → {r['target_new']}"
                                         for r in e.delta.requests),
                         verdict=e.report.get("guard_action"), ppl_after=e.ppl_after,
                         update_ratio=e.report.get("update_ratio")) for e in self.applied]

    # ------------------------------------------------------------ ask, export
    def ask(self, prompt: str, max_new_tokens: int = 40, through: str = "typed"):
        """Yield (unedited answer, edited answer) as they grow, a token at a time; ``through``: the prompt
        as typed, or (``chat``) as the user's message through the model's chat template. Each token is
        produced under the lock, with the weights as they are at that moment (a later edit can
        land between two tokens, never inside one)."""
        prompt = bounded("question", prompt, MAX_PROMPT)
        if not prompt.strip():
            raise CromeError("the question is empty")
        if through not in ASK_THROUGH:
            raise CromeError(f"ask through {through!r}? choose one of {', '.join(ASK_THROUGH)}")
        if through == "chat":
            prompt = chat_text(self.lm.tokenizer, prompt, instruction="{}")
            if prompt is None:
                raise CromeError(f"{self.lm.name} has no chat template: ask as typed")
        n = max(1, min(int(max_new_tokens), MAX_TOKENS))
        ids = self.lm.tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.lm.device)
        seqs, done = [ids, ids], [False, False]
        for _ in range(n):
            for i, state in enumerate((self.unedited, self._current)):
                if not done[i]:
                    with state():
                        seqs[i] = _next_token(self.lm, seqs[i])
                    done[i] = int(seqs[i][0, -1]) == self.lm.tokenizer.eos_token_id
            yield self._decode(seqs[0], ids), self._decode(seqs[1], ids)
            if all(done):
                break

    @contextmanager
    def _current(self):
        with self.lock:
            yield self.lm

    def _decode(self, seq: torch.Tensor, prompt_ids: torch.Tensor) -> str:
        return self.lm.tokenizer.decode(seq[0, prompt_ids.shape[1]:], skip_special_tokens=True)

    def base_fingerprint(self) -> dict:
        """The unedited model's fingerprint over every layer any method here edits."""
        with self.lock:
            layers = sorted(self.base)
            if self._fingerprint is None or sorted(int(x) for x in self._fingerprint["layers"]) != layers:
                with self.unedited():
                    self._fingerprint = fingerprint(self.lm, layers)
            return self._fingerprint

    def export_delta(self, path) -> str:
        """The applied edits as a delta file (``crome apply`` re-applies it)."""
        with self.lock:
            if not self.applied:
                raise CromeError("no edits to export")
            memory = self.memory()
            gate = dict(layer=memory.layer, threshold=memory.threshold, scale=memory.scale) if memory else None
            return str(write_delta(path, self.lm.name, self.base_fingerprint(), [e.delta for e in self.applied], gate))

    def export_model(self, path) -> str:
        """The edited model as a Hugging Face folder (as ``crome edit --save``), with the memory's entries
        beside the weights when there are any (``MEMORY_FILE``: crome's loader puts them back on)."""
        from ..models import save_model

        with self.lock:
            saved = save_model(self.lm, path)
            memory = self.memory()
            if memory is not None and len(memory):
                memory.save(saved / MEMORY_FILE)
            return str(saved)


@torch.no_grad()
def _next_token(lm, ids: torch.Tensor) -> torch.Tensor:
    """``ids`` with the greedy next token appended."""
    top = lm.model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat([ids, top], dim=1)


def _provenance(record: dict) -> dict:
    """What a delta file keeps of an edit's report: how it was made and what it measured."""
    keep = ("seed", "hparams", "context_templates", "key_stats", "layer", "layers", "denominator", "update_ratio",
            "cos_bare_mean", "first_token_subject", "ppl_ratio", "guard_action", "device", "dtype")
    return {k: record[k] for k in keep if k in record}


def _applied_message(record: dict) -> str:
    """One line after an applied edit: what the guard did and the perplexity it left."""
    ratio = record.get("ppl_ratio")
    damage = f" Perplexity is now {ratio:.4f}× the unedited model's." if ratio else ""
    checked = {"verify": " The guard checked that it took and did not damage the model.",
               "refuse": " The guard's rule did not predict a collapse."}.get(record.get("guard", "off"), "")
    action = record.get("guard_action", "applied")
    return f"Applied{'' if action == 'applied' else f' ({action})'}.{checked}{damage}"
