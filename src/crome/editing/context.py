"""What a run of edits needs, in two records, passed down to every path that edits or measures.

* ``RunSettings``: what a run *is*. Every eval record carries these fields and ``--resume``
  checks them (method, model, layer, seed, test prefix, guard, ...).
* ``RunContext``: everything computed once per run that the edit paths use: the settings, the
  hyper-parameters, context templates, key statistics, layer choice, perplexity texts, and the
  model-bound checks (perplexity monitor, guard rule, verifier). The guard, ``crome edit``'s report,
  ``crome eval`` and the analyses take it whole.

Its defaults are filled in two places only: ``evaluation.jobs.prepare`` (a run) and
``api.context_for`` (the Python API).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import CromeError
from ..scoring.monitor import PerplexityMonitor
from ..scoring.readings import OPTIONAL_READINGS
from .hparams import Hparams, edited_layers
from .memory import EditMemory
from .methods import Method, method
from .mom2 import KeyStats
from .norm_anchor import NormAnchor
from .null_space import NullSpace
from .records import LayerChoice
from .rules import GuardRule
from .verify import Verifier


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
    retained_sample: int = 0        # sequential: retained efficacy on at most this many earlier edits (0: all)
    scores_every: int = 1           # sequential: every k-th edit's own efficacy scored (ES/PS/NS, generation EM)
    guard: str = "off"
    guard_threshold: float | None = None
    key_stats_source: str = "off"   # source of C (mom2 adjustment), or "off"
    dtype: str = "float32"          # the model's weights while editing and measuring
    batch_size: int = 1             # MEMIT: cases edited as one update
    gen_em: bool = False            # also generation-based exact match (edit, paraphrases, retained edits)
    readings: tuple[str, ...] = OPTIONAL_READINGS   # read beyond bare and prefixed: after a natural sentence, chat


@dataclass
class RunContext:
    """A run's settings and everything its edits and measurements share."""

    settings: RunSettings
    hparams: Hparams
    templates: list[str]                                     # the context templates (seeded, cached)
    texts: list[str] | None = None                           # perplexity texts (None: no perplexity)
    stats: KeyStats | dict[int, KeyStats] | None = None      # C; a batch method: by layer; None: C = I
    layer_choice: LayerChoice | None = None                  # how the layer was chosen
    rule: GuardRule | None = None                            # refuse, or a pre-check
    verifier: Verifier | None = None                         # verify, fallback
    monitor: PerplexityMonitor | None = None                 # built by ``with_monitor``
    null_space: NullSpace | None = None                      # AlphaEdit: projections, running key sum
    anchor: NormAnchor | None = None                         # NAS: the norm anchor of v*
    memory: EditMemory | None = None                         # a memory method: the gated memory, on the model

    @property
    def method(self) -> Method:
        """The run's method, from the table."""
        return method(self.settings.method)

    def layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers the run's method edits, ascending."""
        return edited_layers(self.settings.method, self.hparams, num_layers)

    def check_checks(self, num_layers: int) -> None:
        """The one rule for the perplexity monitor and the guard's probe: each must start at or below
        the first layer the run's method edits (a batch method edits several)."""
        first = self.layers(num_layers)[0]
        for name, check in (("perplexity monitor", self.monitor), ("guard's probe", self.verifier)):
            if check is not None and check.layer > first:
                raise CromeError(f"the {name} starts at layer {check.layer}; {self.method.label} edits layer {first}")

    def with_settings(self, **changes) -> "RunContext":
        """This context with some settings changed (another method, guard, ...)."""
        return replace(self, settings=replace(self.settings, **changes))

    def with_monitor(self, lm) -> "RunContext":
        """This context with a perplexity monitor from the lowest edited layer up, its baseline the
        model as it is now (call it on the unedited model); unchanged without texts or when built."""
        if self.monitor is not None or not self.texts:
            return self
        return replace(self, monitor=PerplexityMonitor(lm, self.texts, self.layers(lm.num_layers)[0]))
