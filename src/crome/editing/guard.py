"""The collapse guard: judge an edit, apply it if it passes, roll it back when it damages the model.

Two checks, usable together:

* ``verify`` (the default of ``crome edit``, ``verify.py``) applies the edit, measures perplexity
  on a small probe set and checks that the edit took (``efficacy.py``); it restores the exact
  original weights when perplexity grew by more than the threshold ("damaged the model") or the
  edit did not take ("did not take").
* a predictive rule (``rules.GuardRule``), a cheap pre-check that reads only the diagnostics known
  before the weights are touched.

Actions: ``off``; ``refuse`` (the rule predicts a collapse: weights untouched, exit 3);
``verify`` (apply, measure, roll back on damage or when it did not take: exit 3);
``fallback`` (``fallback.py``: if the rule or the checks reject the edit, try the consistent
method at the same layer, then one layer up and one down, verifying each; refuse if all fail).
A batch method is judged as a whole: off or verify (``Method.guards``).

``guarded(lm, requests, ctx)`` is the one entry: the run context says the method, the action,
the rule and the verifier.
"""

from __future__ import annotations

from ..errors import CromeError
from ..models import LoadedModel
from ..request import EditRequest
from .context import RunContext
from .edit import Edit, EditHandle, Prepared, apply_edit, finish_edit, prepare_edit
from .efficacy import EfficacyCheck
from .fallback import at_layer, attempts
from .memit import BatchEdit, apply_memit
from .memory import MemoryEdit, MemoryHandle, memory_edit, store
from .methods import GUARD_ACTIONS, Method, method
from .mom2 import layer_stats, stats_for
from .records import GuardDecision, GuardRefused
from .verify import verify_or_roll_back
from .weights import WeightsHandle


def check_guard(model: str, name: str | Method, action: str, rule=..., verifier=...) -> None:
    """The guard's option rules, in one place: the action exists and the method takes it, refuse
    needs a rule, verify and fallback need a verifier (``...``: not built yet, not checked)."""
    m = method(name)
    if action not in GUARD_ACTIONS:
        raise CromeError(f"unknown guard action '{action}': choose one of {', '.join(GUARD_ACTIONS)}")
    if action not in m.guards:
        raise CromeError(f"--guard {action} is for single-fact methods; {m.label} takes {' or '.join(m.guards)}")
    if action == "refuse" and rule is None:   # a GuardRule, or ... (not built yet)
        raise CromeError(f"--guard refuse needs a rule calibrated for {model} (crome analyze guard --calibrate, "
                         f"then --guard-rule FILE); --guard verify needs none")
    if action in ("verify", "fallback") and verifier is None:
        raise CromeError(f"--guard {action} needs a verifier (probe perplexity)")


def guarded(lm: LoadedModel, requests: list[EditRequest], ctx: RunContext, *, prepared: Prepared | None = None,
            neighbours: bool = True):
    """Compute the context's edit of ``requests`` (one for a single-fact method, the batch for a batch
    method), let its guard judge it, apply it if it passes: (edit, handle, ``GuardDecision``).
    Raises ``GuardRefused`` (weights untouched or restored bit for bit) when the guard stops it."""
    check_guard(lm.name, ctx.method, ctx.settings.guard, ctx.rule, ctx.verifier)
    if ctx.method.batch:
        return guard_batch(lm, requests, ctx)
    if len(requests) != 1:
        raise CromeError(f"{ctx.method.name} edits one fact at a time; several facts as one update: a batch "
                         f"method")
    if ctx.method.gated:
        return guard_memory(lm, requests[0], ctx, prepared=prepared)
    return guard_single(lm, requests[0], ctx, prepared=prepared, neighbours=neighbours)


def guard_memory(lm: LoadedModel, request: EditRequest, ctx: RunContext, *,
                 prepared: Prepared | None = None) -> tuple[MemoryEdit, MemoryHandle, GuardDecision]:
    """A memory method's edit through the guard: its keys and v* as ROME's, stored in the run's memory
    (``ctx.memory``), then, with ``verify``, probe perplexity and efficacy (``Method.test_places``). Raises
    ``GuardRefused`` with the entry taken out again."""
    m, action = ctx.method, ctx.settings.guard
    if ctx.memory is None:
        raise CromeError(f"{m.label} keeps its edits in the run's memory: the run context has none")
    decision = GuardDecision.start(action, m.name, None, ctx.verifier)
    if prepared is None:
        prepared = prepare_edit(lm, request, ctx.hparams, ctx.templates, ctx.settings.seed,
                                layer_choice=ctx.layer_choice)
    edit = memory_edit(lm, prepared, m.name, stats_for(lm, prepared.hparams, ctx.stats))
    verifying = action == "verify"
    check = EfficacyCheck(lm, request, prepared.templates) if verifying and ctx.verifier.efficacy else None
    if verifying:
        ctx.verifier.monitor.at(edit.layer)
    handle = store(ctx.memory, edit, ctx.memory.next_number())
    if verifying:
        problem = verify_or_roll_back(handle, ctx.verifier, decision, edit.layer, check, m)
        if problem:
            decision.guard_action = "rolled back"
            raise GuardRefused(f"guard rolled back the {m.name} edit: {problem}", edit, decision)
    return edit, handle, decision


def guard_single(lm: LoadedModel, request: EditRequest, ctx: RunContext, *, prepared: Prepared | None = None,
                 neighbours: bool = True) -> tuple[Edit, EditHandle | None, GuardDecision]:
    """A single-fact edit through the guard. ``prepared``: the request's keys and v* when already
    computed (``prepare_edits``). ``neighbours``: ``fallback`` may move to a neighbouring layer (off in
    sequential runs). ``handle`` is None when the update is not finite (never applied)."""
    m, action, verifier = ctx.method, ctx.settings.guard, ctx.verifier
    rule = ctx.rule if action != "off" else None
    decision = GuardDecision.start(action, m.name, rule, verifier)
    if prepared is None:       # keys and v* are the same for every method
        prepared = prepare_edit(lm, request, ctx.hparams, ctx.templates, ctx.settings.seed,
                                layer_choice=ctx.layer_choice)
    elif prepared.request != request:
        raise CromeError("the prepared keys and v* are for another request")
    stats = stats_for(lm, prepared.hparams, ctx.stats)
    verifying = action in ("verify", "fallback")
    check = EfficacyCheck(lm, request, prepared.templates) if verifying and verifier.efficacy else None
    problems, edit = [], None
    for tried, offset in attempts(m, action, neighbours):
        here, here_stats = at_layer(lm, prepared, stats, offset)
        if here is None:
            continue
        edit = finish_edit(lm, here, tried, here_stats)
        decision.edited_with = tried.name
        outcome = _judge(lm, edit, ctx, decision, check, problems)
        if outcome == "stop":
            break
        if outcome == "next":
            continue
        if (tried, offset) != (m, 0):
            where = f" at layer {edit.layer}" if offset else ""
            decision.guard_action = f"fallback: {tried.name}{where} instead of {m.name}"
        decision.guard_reason = None
        return edit, outcome, decision
    decision.guard_action = "rolled back" if decision.guard_ppl_ratio is not None and action == "verify" else "refused"
    raise GuardRefused(f"guard {decision.guard_action} the {m.name} edit: " + "; ".join(problems), edit, decision)


def _judge(lm: LoadedModel, edit: Edit, ctx: RunContext, decision: GuardDecision, check, problems: list[str]):
    """One attempt of ``guard_single``: "stop" (refused, try nothing else), "next" (try the next one),
    None (not finite, not applied: keep it), or the applied edit's handle."""
    action, where = ctx.settings.guard, f"{edit.method} at layer {edit.layer}"
    rule = ctx.rule if action != "off" else None
    if rule is not None:
        predicted = decision.guard_predicted_collapse = rule.predicts_collapse(edit.diagnostics)
        if predicted:
            problems.append(f"{where}: {rule.reason(edit.diagnostics)}")
            decision.guard_reason = "predicted collapse"
            return "stop" if action == "refuse" else "next"
    if not edit.diagnostics.finite:
        if action == "fallback":
            problems.append(f"{where}: non-finite update")
            return "next"
        return None
    verifying = action in ("verify", "fallback")
    if verifying:
        ctx.verifier.monitor.at(edit.layer)  # a monitor below the run's layer takes its baseline now, unedited
    handle = apply_edit(lm, edit)
    if verifying:
        problem = verify_or_roll_back(handle, ctx.verifier, decision, edit.layer, check, method(edit.method))
        if problem:
            problems.append(f"{where}: {problem}, rolled back")
            return "next"
    return handle


def guard_batch(lm: LoadedModel, requests: list[EditRequest],
                ctx: RunContext) -> tuple[BatchEdit, WeightsHandle, GuardDecision]:
    """A batch method's edit through the guard: compute and apply the update (computing is applying),
    then a ``rule`` (``--guard-rule``) on the batch's diagnostics, then, with ``verify``, probe
    perplexity. Raises ``GuardRefused`` with the weights restored."""
    m, action = ctx.method, ctx.settings.guard
    rule = ctx.rule if action != "off" else None
    if rule is not None and rule.feature == "denominator":
        raise CromeError("the guard rule reads the denominator, which is ROME's: a MEMIT batch has none")
    decision = GuardDecision.start(action, m.name, rule, ctx.verifier)
    stats = ctx.stats if ctx.stats is not None else layer_stats(lm, m, ctx.hparams)
    edit, handle = apply_memit(lm, requests, m, ctx.hparams, stats, ctx.templates, ctx.settings.seed,
                               null_space=ctx.null_space, anchor=ctx.anchor)
    if rule is not None:
        diagnostics = edit.diagnostics
        predicted = decision.guard_predicted_collapse = rule.predicts_collapse(diagnostics)
        if predicted:
            handle.restore()
            decision.guard_reason, decision.guard_action = "predicted collapse", "refused"
            raise GuardRefused(f"guard refused the {m.name} batch: {rule.reason(diagnostics)}", edit, decision)
    if action == "verify":
        problem = verify_or_roll_back(handle, ctx.verifier, decision, ctx.verifier.layer)
        if problem:
            decision.guard_action = "rolled back"
            raise GuardRefused(f"guard rolled back the {m.name} batch: {problem}", edit, decision)
    return edit, handle, decision
