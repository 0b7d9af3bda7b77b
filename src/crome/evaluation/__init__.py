"""Evaluation: what an edit did.

``datasets`` (CounterFact, zsRE) → ``measure`` (probabilities, perplexity) and ``metrics``
(ES/PS/NS, fluency) → ``evaluate`` (one case, a run, its results file) → ``summary`` (tables);
``jobs`` is a run as data (what ``crome eval``, its workers and ``crome sweep`` share), ``report``
the record of ``crome edit``, ``texts`` the perplexity texts.
"""
