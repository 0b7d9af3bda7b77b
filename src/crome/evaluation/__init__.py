"""Evaluation: what an edit did, over runs of cases.

``datasets`` (CounterFact, zsRE) → ``cases`` (edit and measure independent cases, each through the
guard) with ``scores`` (the metric families of ``scoring.metrics`` for each case) → ``evaluate`` (the
run loop and its results file, ``results``; a sequential run's bookkeeping, ``sequential``, and
checkpoints, ``checkpoint``) → ``summary`` (tables). ``jobs`` is a run as data (what ``crome eval``,
its workers and ``crome sweep`` share), ``options`` the rules between options, ``record`` a case's
typed record, ``report`` the record of ``crome edit``, ``demo`` the loop of ``crome demo``.
"""
