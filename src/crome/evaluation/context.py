"""What a run of edits needs, in two records.

* ``RunSettings``: what a run *is*. Every eval record carries these fields and ``--resume``
  checks them (method, model, layer, seed, test prefix, guard, ...).
* ``RunContext``: everything computed once per run that the edit paths use: the settings, the
  hyper-parameters, context templates, key statistics, layer choice, perplexity texts, and the
  model-bound checks (perplexity monitor, guard rule, verifier). ``evaluate_cases`` and ``run``
  take ``(lm, cases, ctx, ...)``.

``EvalJob`` (jobs.py) is what the user asked for; ``jobs.prepare`` turns it into a context.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..editing.hparams import Hparams
from ..editing.memit import edited_layers


@dataclass(frozen=True)
class RunSettings:
    """What a run is: every record carries it, and ``--resume`` checks it."""

    method: str
    model: str
    layer: int
    seed: int
    test_prefix: str = "fixed"
    data: str = ""
    ppl_data: str = ""
    gen_tokens: int = 100
    sequential: bool = False
    monitor_every: int = 1
    retained_every: int = 0         # sequential: retained efficacy every k-th edit (0: with the perplexity)
    guard: str = "off"
    guard_threshold: float | None = None
    key_stats_source: str = "off"   # source of C (mom2 adjustment), or "off"
    dtype: str = "float32"          # the model's weights while editing and measuring
    batch_size: int = 1             # MEMIT: cases edited as one update
    gen_em: bool = False            # also generation-based exact match (edit, paraphrases, retained edits)


@dataclass
class RunContext:
    """A run's settings and everything its edits and measurements share."""

    settings: RunSettings
    hparams: Hparams
    templates: list[str] | None          # None: each edit samples them (seeded)
    texts: list[str] | None = None       # perplexity texts (None: no perplexity)
    stats: object = None                 # KeyStats; MEMIT: {layer: KeyStats}; None: C = I
    layer_choice: object = None          # LayerChoice: how the layer was chosen
    rule: object = None                  # GuardRule (refuse, or a pre-check)
    verifier: object = None              # Verifier (verify, fallback)
    monitor: object = None               # PerplexityMonitor, built by ``with_monitor``
    null_space: object = None            # AlphaEdit: NullSpace (projections, running key sum)

    @classmethod
    def of(cls, lm, method: str, hparams: Hparams | None = None, seed: int = 0, guard: str = "off",
           **fields) -> "RunContext":
        """A context for edits outside a prepared run (``report.measure_edit`` from Python): the
        model's resolved defaults unless ``hparams`` is given; other fields by name."""
        from ..editing.layer_choice import resolve

        hp, choice = resolve(lm, hparams, None, seed)
        settings = RunSettings(method=method, model=lm.name, layer=hp.layer, seed=seed, guard=guard)
        return cls(settings, hp, fields.pop("templates", None), layer_choice=fields.pop("layer_choice", choice),
                   **fields)

    def layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers the run's method edits."""
        return edited_layers(self.settings.method, self.hparams, num_layers)

    def with_monitor(self, lm) -> "RunContext":
        """This context with a perplexity monitor from the lowest edited layer up, its baseline the
        model as it is now (call it on the unedited model); unchanged without texts or when built."""
        from ..editing.fast import PerplexityMonitor

        if self.monitor is not None or not self.texts:
            return self
        return replace(self, monitor=PerplexityMonitor(lm, self.texts, self.layers(lm.num_layers)[0]))
