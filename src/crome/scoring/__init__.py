"""Scoring: what a model says about requests and texts, below editing (it needs no edit).

``measure`` (target probabilities, generation, perplexity, the collapse verdict), ``metrics``
(the formulas, free of any model) and ``texts`` (perplexity and key-statistics text sets).
"""
