"""Where users look: an edit read in four places (issue 38).

A consistent edit (C-ROME) is learned for prefixed contexts, so it can show after the test-time
prefix and not where a user asks. Every edit is therefore read in four places:

* ``bare``: the prompt as typed;
* ``natural``: the prompt after a natural sentence (``NATURAL_LEAD_INS``, a small fixed set, one
  drawn per case with the run's seed), not random tokens;
* ``prefix``: after the test-time prefix ("The Fall of ROME"'s test context);
* ``chat``: the prompt asked through the model's chat template (``CHAT_INSTRUCTION``), scored on
  the greedy answer (``chat_answer_matches``); models without a chat template have no chat reading.
"""

from __future__ import annotations

import random
import re

from ..errors import CromeError

READINGS = ("bare", "natural", "prefix", "chat")
# the readings an eval run may leave out (``--readings``): the bare prompt and the test prefix are its
# records' own metrics; these two cost a second scoring pass and 40-token generations per prompt
OPTIONAL_READINGS = ("natural", "chat")


def optional_readings(text: str) -> tuple[str, ...]:
    """``--readings``' value (comma-separated, or ``none``) as a tuple in ``OPTIONAL_READINGS``' order."""
    names = {n.strip() for n in text.split(",") if n.strip()} - {"none"}
    unknown = names - set(OPTIONAL_READINGS)
    if unknown:
        raise CromeError(f"unknown reading {', '.join(sorted(unknown))!r}: choose from {', '.join(OPTIONAL_READINGS)} "
                         f"or none (the bare prompt and the test prefix are always read)")
    return tuple(n for n in OPTIONAL_READINGS if n in names)

# natural sentences a prompt might follow in a user's text: each ends a sentence, so the prompt reads
# as the next one
NATURAL_LEAD_INS = (
    "Here is something I learned today.",
    "My teacher mentioned this in class.",
    "I looked it up in an encyclopedia.",
    "This came up in a quiz last night.",
    "A friend asked me about this yesterday.",
    "I read an article about it this morning.",
)
CHAT_INSTRUCTION = "Complete the sentence: {}"
CHAT_TOKENS = 40   # the greedy answer's length: room to restate the prompt and give the answer


def natural_lead_in(seed: int = 0, case_id: str = "") -> str:
    """The natural sentence before a case's prompt: one of ``NATURAL_LEAD_INS``, drawn with (seed, case id)."""
    return random.Random(f"natural:{seed}:{case_id}").choice(NATURAL_LEAD_INS)


def chat_text(tokenizer, prompt: str, instruction: str = CHAT_INSTRUCTION) -> str | None:
    """The prompt asked through the tokenizer's chat template (as the user's message, in
    ``instruction``), ready for the assistant's answer (None: the model has no chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": instruction.format(prompt)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]          # the tokenizer adds it again
    return text


def _first_at(text: str, word: str | None) -> int | None:
    """Where ``word`` first occurs in ``text`` as whole words, case-insensitive (None: nowhere)."""
    if not word or not word.strip():
        return None
    found = re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", text, flags=re.IGNORECASE)
    return found.start() if found else None


def chat_answer_matches(answer: str, target_new: str, target_old: str | None = None) -> bool:
    """The chat reading's score: the greedy answer names the new target, as whole words, and names it
    before the old target if it names both."""
    new, old = _first_at(answer, target_new), _first_at(answer, target_old)
    return new is not None and (old is None or new < old)


def read_places(lm, prompt: str, target_new: str, target_old: str | None, prefix: str | None,
                lead_in: str) -> dict[str, dict]:
    """The edit's prompt read in the four places on the model as it is now: P(target_new) bare, after
    ``lead_in`` and after ``prefix``; through the chat template, the greedy answer and whether it names
    the new target first (``chat_answer_matches``). {place: {...}}; no chat entry without a template."""
    from .measure import greedy_answers, target_probability

    out = {"bare": dict(p_target=target_probability(lm, prompt, target_new)),
           "natural": dict(p_target=target_probability(lm, prompt, target_new, prefix=lead_in), text=lead_in)}
    if prefix:
        out["prefix"] = dict(p_target=target_probability(lm, prompt, target_new, prefix=prefix), text=prefix)
    chat = chat_text(lm.tokenizer, prompt)
    if chat is not None:
        answer = greedy_answers(lm, [chat], [CHAT_TOKENS])[0]
        out["chat"] = dict(answer=answer, named=chat_answer_matches(answer, target_new, target_old))
    return out


PLACE_LABELS = {"bare": "as typed", "natural": "after a natural sentence", "prefix": "after the test prefix",
                "chat": "through the chat template"}


def readings_rows(readings: dict) -> list[list[str]]:
    """``crome edit``'s and the page's rows of the four readings: [where, before, after], P(target)
    for the first three, the greedy answer (and whether it names the target) through the chat template."""
    rows = []
    for place, got in readings.items():
        before, after = got["before"], got.get("after")
        label = PLACE_LABELS[place] + (f" {before['text']!r}" if before.get("text") else "")
        if place == "chat":
            cells = [f"{'names it' if r['named'] else 'does not'}: {r['answer'].strip()[:80]!r}" if r else "—"
                     for r in (before, after)]
        else:
            cells = [f"{r['p_target']:.3g}" if r else "—" for r in (before, after)]
        rows.append([f"P(target) {label}" if place != "chat" else f"answer {label}", *cells])
    return rows
