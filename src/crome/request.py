"""Edit requests and where their subject and target sit in token space."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .errors import CromeError

SLOT = "{}"


@dataclass(frozen=True)
class EditRequest:
    """"{subject} ... prompt" should now continue with ``target_new``.

    ``prompt`` holds ``{}`` where the subject goes. ``EditRequest.create``
    also accepts a prompt with the subject written out (flat CounterFact).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    @classmethod
    def create(cls, prompt: str, subject: str, target_new: str, target_true: str | None = None) -> "EditRequest":
        if not isinstance(prompt, str) or not prompt.strip():
            raise CromeError("empty prompt")
        if not isinstance(subject, str) or not subject.strip():
            raise CromeError("empty subject")
        if not isinstance(target_new, str) or not target_new.strip():
            raise CromeError("empty target: target_new must be a non-empty string")
        if target_true is not None and not str(target_true).strip():
            target_true = None
        subject = subject.strip()
        n_slots = prompt.count(SLOT)
        if n_slots > 1:
            raise CromeError(f"prompt has {n_slots} '{{}}' slots, expected one: {prompt!r}")
        if n_slots == 0:
            if subject not in prompt:
                raise CromeError(f"subject {subject!r} not in prompt {prompt!r}")
            prompt = prompt.replace(subject, SLOT, 1)
        return cls(prompt=prompt, subject=subject, target_new=target_new.strip(),
                   target_true=target_true.strip() if target_true else None)

    def text(self, template: str = SLOT) -> str:
        """The prompt inside a context template, subject filled in."""
        return template.replace(SLOT, self.prompt, 1).replace(SLOT, self.subject, 1)

    def to_dict(self) -> dict:
        return asdict(self)


def load_requests(path) -> list[EditRequest]:
    """Edit requests from a file: ``parse_requests`` of its text."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise CromeError(f"requests file not found: {path}")
    return parse_requests(path.read_text(encoding="utf-8"), str(path))


def parse_requests(text: str, source: str = "requests") -> list[EditRequest]:
    """Edit requests from a JSON list or JSON lines: objects with prompt, subject, target_new
    (or target) and optionally target_true. ``source`` names them in errors."""
    import json

    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError as exc:
        raise CromeError(f"{source}: not JSON or JSON lines ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(rows, list):
        raise CromeError(f"{source}: expected a list of requests")
    requests = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise CromeError(f"{source}: request {i}: expected an object")
        try:
            requests.append(EditRequest.create(row.get("prompt"), row.get("subject"),
                                               row.get("target_new", row.get("target")), row.get("target_true")))
        except CromeError as exc:
            raise CromeError(f"{source}: request {i}: {exc}") from None
    if not requests:
        raise CromeError(f"{source}: no requests")
    return requests


def requests_from_input(prompt: str | None = None, subject: str | None = None, target: str | None = None,
                        target_true: str | None = None, *, batch: bool, listed=None, source: str = "requests",
                        batch_methods: tuple[str, ...] = ()) -> list[EditRequest]:
    """The facts of one edit, by the one rule ``crome edit`` and ``crome serve``'s page share: either one
    fact's fields (``prompt``, ``subject``, ``target``: None when not given, ``target_true`` optional),
    or ``listed``, a list of facts edited as one update, which only a ``batch`` method takes: its text
    (JSON list or JSON lines, named ``source`` in errors) or a path to a file of it (``os.PathLike``).
    ``batch_methods``: the methods the error for a list with another method names. The rule's own
    errors name ``crome edit``'s flags; the page picks one of its inputs before calling (a list only for
    a batch method, its fields always strings), so it meets only those of the facts themselves."""
    import os

    if listed is not None and not batch:
        raise CromeError("--requests edits several facts as one update: use --method " + ", ".join(batch_methods))
    given = [x for x in (prompt, subject, target) if x is not None]
    if listed is not None and given:
        raise CromeError("give either --requests or --prompt/--subject/--target, not both")
    if listed is None and len(given) < 3:
        raise CromeError("an edit needs --prompt, --subject and --target (or --requests with MEMIT)")
    if isinstance(listed, os.PathLike):
        return load_requests(listed)
    if listed is not None:
        return parse_requests(listed, source)
    return [EditRequest.create(prompt, subject, target, target_true)]


@dataclass(frozen=True)
class Located:
    """A tokenized prompt and the token positions of its subject."""

    ids: list[int]
    subject_first: int
    subject_last: int
    first_content: int  # index of the first non-special token (0 without BOS)

    @property
    def subject_is_first(self) -> bool:
        return self.subject_first == self.first_content


def locate(tokenizer, request: EditRequest, template: str = SLOT) -> Located:
    """Tokenize ``request`` inside ``template`` and find its subject from character offsets.

    The subject's last token is the token whose span holds the subject's last
    character, so a BPE merge across the subject's boundary is handled.
    """
    with_slot = template.replace(SLOT, request.prompt, 1)
    start = with_slot.index(SLOT)
    text = with_slot.replace(SLOT, request.subject, 1)
    end = start + len(request.subject)
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    content = [i for i, (a, b) in enumerate(offsets) if b > a and ids[i] not in special]
    first_content = content[0] if content else 0
    covering = [i for i in content if offsets[i][0] < end and offsets[i][1] > start]
    if not covering:
        raise CromeError(f"subject {request.subject!r} not found in tokens of {text!r}")
    return Located(ids=list(ids), subject_first=covering[0], subject_last=covering[-1], first_content=first_content)


def target_ids(tokenizer, prompt_text: str, target: str) -> list[int]:
    """Token ids of ``target`` as the model would continue ``prompt_text`` (a space between)."""
    if not target.strip():
        raise CromeError("empty target")
    prompt_ids = tokenizer(prompt_text)["input_ids"]
    full_ids = tokenizer(prompt_text + " " + target.strip())["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        # a tokenizer that merges across the boundary: fall back to the target alone
        ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    else:
        ids = full_ids[len(prompt_ids):]
    if not ids:
        raise CromeError(f"target {target!r} has no tokens")
    return list(ids)


def pad_right(sequences: list[list[int]], pad_id: int, device: torch.device,
              left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists into (input_ids, attention_mask): on the right, or on the left with ``left``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)
