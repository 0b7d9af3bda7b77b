"""Measuring a (possibly edited) model: target probability, generation, perplexity.

Every helper takes ``prefix=``: a context prefix prepended to the prompt at
test time ("The Fall of ROME": an edit learned on prefixed contexts should be
queried in one, which restores efficacy on first-token subjects).
``Prefixed(lm, prefix)`` fixes one prefix for every call.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..errors import CromeError
from ..hooks import widen
from ..models import LoadedModel
from ..request import pad_right, target_ids

# A model is called collapsed when its perplexity grows by more than this factor.
# Healthy single edits move perplexity by a few percent; collapsed ROME edits
# by orders of magnitude (README, "Perplexity and the collapse verdict").
COLLAPSE_RATIO = 2.0


def with_prefix(prefix: str | None, prompt: str) -> str:
    return f"{prefix.strip()} {prompt}" if prefix else prompt


@torch.no_grad()
def target_logprob(lm: LoadedModel, prompt: str, target: str, prefix: str | None = None) -> float:
    """log P(target tokens | prefix + prompt), summed over the target's tokens."""
    text = with_prefix(prefix, prompt)
    ctx = lm.tokenizer(text)["input_ids"]
    tgt = target_ids(lm.tokenizer, text, target)
    ids = torch.tensor([ctx + tgt], device=lm.device)
    logits = widen(lm.model(input_ids=ids).logits[0, len(ctx) - 1: -1])
    lp = torch.log_softmax(logits, -1)
    return float(lp[torch.arange(len(tgt)), torch.tensor(tgt, device=lm.device)].sum())


@dataclass
class TargetScore:
    """A target, teacher-forced after its prompt: per target token, its log-prob,
    the model's argmax token, and whether they agree."""

    logprobs: list[float]
    predicted: list[int]
    target: list[int]

    @property
    def hits(self) -> list[bool]:
        return [p == t for p, t in zip(self.predicted, self.target)]


@torch.no_grad()
def score_targets(lm: LoadedModel, pairs: list[tuple[str, str]], prefix: str | None = None,
                  batch_size: int = 32, overlay=None, owners: list[int | None] | None = None) -> list[TargetScore]:
    """Score many (prompt, target) pairs in padded batches; the output layer runs
    only at the positions that predict target tokens. With an ``overlay``
    (``editing.edit.Overlay``), pair i is scored under edit ``owners[i]`` (None: unedited)."""
    seqs, spans = [], []
    for prompt, target in pairs:
        text = with_prefix(prefix, prompt)
        ctx = lm.tokenizer(text)["input_ids"]
        tgt = target_ids(lm.tokenizer, text, target)
        seqs.append(ctx + tgt)
        spans.append((len(ctx), tgt))
    scores: list[TargetScore] = []
    for start in range(0, len(seqs), batch_size):
        chunk, chunk_spans = seqs[start:start + batch_size], spans[start:start + batch_size]
        ids, mask = pad_right(chunk, lm.tokenizer.pad_token_id, lm.device)
        edited = overlay.rows(lm, owners[start:start + batch_size]) if overlay is not None else nullcontext()
        with edited:
            hidden = lm.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        rows = torch.tensor([i for i, (_, t) in enumerate(chunk_spans) for _ in t], device=lm.device)
        pos = torch.tensor([n - 1 + j for n, t in chunk_spans for j in range(len(t))], device=lm.device)
        tgt = torch.tensor([x for _, t in chunk_spans for x in t], device=lm.device)
        lp = torch.log_softmax(lm.logits(hidden[rows, pos]), -1)
        token_lp = lp.gather(-1, tgt[:, None])[:, 0].tolist()
        argmax = lp.argmax(-1).tolist()
        at = 0
        for _, t in chunk_spans:
            scores.append(TargetScore(token_lp[at:at + len(t)], argmax[at:at + len(t)], list(t)))
            at += len(t)
    return scores


def target_probability(lm: LoadedModel, prompt: str, target: str, prefix: str | None = None) -> float:
    return math.exp(target_logprob(lm, prompt, target, prefix))


@torch.no_grad()
def generate(lm: LoadedModel, prompt: str, max_new_tokens: int = 30, prefix: str | None = None) -> str:
    """Greedy continuation of ``prefix + prompt`` (the prefix is not returned)."""
    text = with_prefix(prefix, prompt)
    enc = lm.tokenizer(text, return_tensors="pt").to(lm.device)
    out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=lm.tokenizer.pad_token_id)
    return lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def current_answer(lm: LoadedModel, prompt: str, max_new_tokens: int = 4) -> str:
    """The model's own answer to ``prompt``: the first word of its greedy continuation."""
    for word in generate(lm, prompt, max_new_tokens).split():
        if word.strip(".,;:!?\"'()"):
            return word.strip(".,;:!?\"'()")
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"].to(lm.device)
    with torch.no_grad():
        top = int(lm.model(input_ids=ids).logits[0, -1].argmax())
    return lm.tokenizer.decode([top]).strip() or lm.tokenizer.decode([top])


@torch.no_grad()
def sample(lm: LoadedModel, prompts: list[str], max_new_tokens: int, seed: int, top_k: int = 5,
           prefix: str | None = None, overlay=None, owner: int | None = None) -> list[str]:
    """Top-k sampled continuations (ROME's fluency setting: top-k 5), seeded, batched;
    with an ``overlay``, under its edit ``owner``."""
    seqs = [lm.tokenizer(with_prefix(prefix, p))["input_ids"] for p in prompts]
    ids, mask = pad_right(seqs, lm.tokenizer.pad_token_id, lm.device, left=True)
    devices = [lm.device] if lm.device.type == "cuda" else []
    edited = overlay.rows(lm, [owner] * len(seqs)) if overlay is not None else nullcontext()
    with torch.random.fork_rng(devices=devices), edited:
        torch.manual_seed(seed)
        out = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0,
                                pad_token_id=lm.tokenizer.pad_token_id)
    return [lm.tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]


def answer_matches(generated: str, target: str) -> bool:
    """Exact match of a generated answer: it begins with the target, and the target's last word
    ends there ("Paris" matches "Paris, France", not "Parisian")."""
    text, want = generated.strip(), target.strip()
    return bool(want) and text.startswith(want) and not text[len(want):len(want) + 1].isalnum()


@torch.no_grad()
def greedy_answers(lm: LoadedModel, texts: list[str], lengths: list[int], batch_size: int = 32, overlay=None,
                   owners: list[int | None] | None = None) -> list[str]:
    """Greedy continuations of ``texts``, batched (left-padded), each batch as long as its longest
    ``lengths``; with an ``overlay``, text i is generated under edit ``owners[i]``."""
    answers = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        ids, mask = pad_right([lm.tokenizer(t)["input_ids"] for t in chunk], lm.tokenizer.pad_token_id, lm.device,
                              left=True)
        rows = owners[start:start + batch_size] if overlay is not None else None
        longest = max(lengths[start:start + batch_size])
        with overlay.rows(lm, rows) if overlay is not None else nullcontext():
            out = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest,
                                    do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        answers += [lm.tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]
    return answers


def generation_matches(lm: LoadedModel, pairs: list[tuple[str, str]], prefix: str | None = None,
                       batch_size: int = 32, overlay=None, owners: list[int | None] | None = None) -> list[bool]:
    """Generation-based exact match (the WILD protocol's): greedy-generate after each prompt, as many
    tokens as the target has plus one (to see where its word ends), and ``answer_matches`` the target.
    Not teacher-forced: the model's own tokens feed the next step. With an ``overlay``, pair i is
    generated under edit ``owners[i]``."""
    texts = [with_prefix(prefix, p) for p, _ in pairs]
    lengths = [len(target_ids(lm.tokenizer, t, target)) + 1 for t, (_, target) in zip(texts, pairs)]
    answers = greedy_answers(lm, texts, lengths, batch_size, overlay, owners)
    return [answer_matches(a, target) for a, (_, target) in zip(answers, pairs)]


# Rows of the output layer computed at once when scoring text: a 262k-token vocabulary (Gemma 3) makes
# the logits of a whole batch gigabytes; 512 rows of them stay small and cost the same matrix product.
OUTPUT_ROWS = 512


def next_token_nll(lm: LoadedModel, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """The summed negative log-likelihood of each padded text's next tokens, from the final hidden states,
    and how many tokens it counts. The output layer runs only at real (unpadded) positions,
    ``OUTPUT_ROWS`` at a time; per-token values are summed in float64."""
    real = mask[:, 1:].bool()
    states, targets = hidden[:, :-1][real], ids[:, 1:][real]
    nll = 0.0
    for start in range(0, len(targets), OUTPUT_ROWS):
        logits = lm.logits(states[start:start + OUTPUT_ROWS])
        lost = torch.nn.functional.cross_entropy(logits, targets[start:start + OUTPUT_ROWS], reduction="none")
        nll += float(lost.double().sum())
    return nll, len(targets)


@torch.no_grad()
def perplexity(lm: LoadedModel, texts: list[str], batch_size: int = 10, max_length: int = 256) -> float:
    """Token-weighted perplexity: exp(total NLL / number of predicted tokens)."""
    nll, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        seqs = [lm.tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
                for t in texts[start:start + batch_size]]
        ids, mask = pad_right(seqs, lm.tokenizer.pad_token_id, lm.device)
        hidden = lm.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        lost, counted = next_token_nll(lm, hidden, ids, mask)
        nll, count = nll + lost, count + counted
    return math.exp(nll / count)


def collapsed(ppl_before: float, ppl_after: float, threshold: float = COLLAPSE_RATIO) -> bool:
    """The collapse verdict: perplexity grew by more than ``threshold`` (or is not finite)."""
    return not math.isfinite(ppl_after) or ppl_after / ppl_before > threshold


def ppl_fields(ppl_before: float, ppl_after: float) -> dict:
    """A record's perplexity fields after an edit, against ``ppl_before`` (the unedited model)."""
    return dict(ppl_after=ppl_after, ppl_ratio=ppl_after / ppl_before, collapsed=collapsed(ppl_before, ppl_after))


@dataclass
class Prefixed:
    """A model queried with a fixed context prefix prepended to every prompt."""

    lm: LoadedModel
    prefix: str

    def target_probability(self, prompt: str, target: str) -> float:
        return target_probability(self.lm, prompt, target, prefix=self.prefix)

    def generate(self, prompt: str, max_new_tokens: int = 30) -> str:
        return generate(self.lm, prompt, max_new_tokens, prefix=self.prefix)


def template_prefix(template: str) -> str:
    """The prefix text of a context template "<text>. {}"."""
    return template.replace("{}", "").strip()


TEST_PREFIXES = ("none", "fixed", "random")


def choose_test_prefix(mode: str, templates: list[str], seed: int = 0, case_id: str = "") -> str | None:
    """The one rule for the prefix prepended at test time: none, the first sampled context template's
    text (``fixed``), or one of the edit's context templates drawn with (seed, case_id) (``random``)."""
    if mode not in TEST_PREFIXES:
        raise CromeError(f"unknown test prefix '{mode}': choose one of {', '.join(TEST_PREFIXES)}")
    sampled = [t for t in templates if template_prefix(t)]
    if mode == "none" or not sampled:
        return None
    if mode == "fixed":
        return template_prefix(sampled[0])
    return template_prefix(random.Random(f"{seed}:{case_id}").choice(sampled))
