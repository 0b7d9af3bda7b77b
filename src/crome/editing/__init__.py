"""Editing: one fact (or a batch) into the weights, in the paper's steps, in layers read bottom to top.

0. ``methods`` (the table of methods), ``hparams`` (the defaults), ``records`` (shared records);
1. ``templates`` (context prefixes), ``mom2`` (key statistics C);
2. ``weights`` (factors, handles, overlays, replay), ``delta`` (delta files);
3. the steps at a chosen layer and C: ``compute_key`` (k^u, k̄) → ``compute_value`` (v*, with the
   ``fast`` runner) → ``update`` (ΔW, the one equation); ``edit`` (the rank-one step), ``memit`` and
   ``null_space`` (the batch step);
4. ``efficacy`` (did it take);
5. ``locate`` (causal tracing), ``layer_choice``;
6. the guard's parts: ``rules``, ``verify``, ``fallback``;
7. ``context`` (the run context);
8. ``guard`` (one entry for every edit);
9. ``api`` (the public wrappers that fill in defaults).

docs/ARCHITECTURE.md describes the layers; tests/test_layers.py checks them.
"""
