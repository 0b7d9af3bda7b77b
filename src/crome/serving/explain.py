"""An edit's numbers in words: the collapse-relevant diagnostics, one line each, and why the guard
refused or rolled back an edit, for someone who has not read the papers."""

from __future__ import annotations

from ..editing.records import Diagnostics, GuardRefused
from ..request import EditRequest


def explain_diagnostics(d) -> list[str]:
    """One line per collapse-relevant diagnostic of a ROME/C-ROME edit (``Diagnostics``); a MEMIT
    list has none of these (``BatchDiagnostics`` or None: an empty list)."""
    if not isinstance(d, Diagnostics):
        return []
    lines = [
        f"denominator k·u = {d.denominator:.3g}: the update divides by it; near zero, the update explodes "
        f"(the 'Fall of ROME' collapse).",
        f"update ratio ‖ΔW‖/‖W‖ = {d.update_ratio:.3g}: how much the layer's weights move; a few percent is "
        f"ordinary, above about 1 the model usually breaks.",
        f"cos(k^u, k̄) = {d.cos_bare_mean:.3g}: agreement of the bare prompt's key with the averaged key; "
        f"low agreement is what makes plain ROME's denominator tiny.",
        "subject is the prompt's first token: the risky case for ROME (the first position's keys are outliers); "
        "C-ROME uses the averaged key and a test-time prefix." if d.first_token_subject else
        "subject is not the first token: the easy case.",
    ]
    why = d.unlikely_to_take()
    if why:
        lines.append(f"unlikely to take: {why}.")
    return lines


def explain_refusal(refused: GuardRefused, request: EditRequest) -> str:
    """Why the guard stopped an edit, in words a non-specialist understands; the model is unchanged."""
    d = refused.decision
    unchanged = "The model is unchanged."
    if d is None:
        return f"The edit was stopped: {refused}. {unchanged}"
    if d.guard_reason == "predicted collapse":
        return (f"Refused before applying: its numbers predict it would break the model (it would change the "
                f"layer far more than an ordinary edit). {unchanged}")
    if d.guard_ppl_ratio is not None and d.guard_threshold is not None and d.guard_ppl_ratio > d.guard_threshold:
        return (f"Rolled back: after the edit the model found ordinary text {d.guard_ppl_ratio:.2g}× harder to "
                f"predict (the limit is {d.guard_threshold:g}×), a sign it would damage unrelated answers. {unchanged}")
    if d.guard_took is False:
        return (f"Rolled back: the edit did not take; the model still does not prefer '{request.target_new}' "
                f"for '{request.text()}'. {unchanged}")
    return f"The guard {d.guard_action} the edit: {refused}. {unchanged}"
