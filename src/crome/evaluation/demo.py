"""``crome demo`` as a library function: the reference method, its consistent fix and the default
(``DEMO_METHODS``) edit the same facts, each on the unedited model, measured side by side.

The cases: a subject that is the prompt's first token (the first position's keys are outliers, and
the reference edit collapses the model) and a subject later in the prompt (the easy case).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

from ..editing.context import RunContext
from ..editing.methods import DEMO_METHODS
from ..models import LoadedModel
from ..request import EditRequest
from ..scoring.measure import generate
from .jobs import Status, quiet
from .report import edit_and_report


@dataclass(frozen=True)
class DemoCase:
    """One fact the demo edits: ``prompt`` holds ``{}`` where ``subject`` goes."""

    label: str
    prompt: str
    subject: str
    target: str

    @property
    def request(self) -> EditRequest:
        return EditRequest.create(self.prompt, self.subject, self.target)


DEMO_CASES = (
    DemoCase("first-token subject", "{} is the capital of", "Paris", "Germany"),
    DemoCase("subject later in the prompt", "The mother tongue of {} is", "Danielle Darrieux", "English"),
)


@dataclass
class DemoResult:
    """One case: the unedited model's generation and each method's report (in ``methods`` order)."""

    case: DemoCase
    request: EditRequest
    unedited_generation: str
    reports: list           # EditReport per method

    def to_dict(self) -> dict:
        return {"case": self.case.label, "unedited_generation": self.unedited_generation,
                "reports": [r.to_dict() for r in self.reports]}


def run_demo(lm: LoadedModel, ctx: RunContext, tokens: int = 20, ppl_data: str | None = None,
             status: Status = quiet, methods: tuple[str, ...] = DEMO_METHODS,
             cases: tuple[DemoCase, ...] = DEMO_CASES) -> Iterator[DemoResult]:
    """Edit each case with each method (``ctx``'s settings and guard otherwise; every edit restored),
    measured by a perplexity monitor built here on the unedited model, ``tokens`` generated before and
    after. Yields each case's ``DemoResult`` as it finishes; ``ppl_data`` names the perplexity texts."""
    with status("perplexity of the unedited model"):
        ctx = ctx.with_monitor(lm)
    for case in cases:
        request = case.request
        unedited = generate(lm, request.text(), tokens)
        reports = []
        for method in methods:
            with status(f"{case.label}: {method} edit of {request.text()!r} → {case.target}"):
                report, _ = edit_and_report(lm, [request], replace(ctx, settings=replace(ctx.settings, method=method)),
                                            ppl_data=ppl_data, generate_tokens=tokens)
            reports.append(report)
        yield DemoResult(case, request, unedited, reports)
