"""Editing: one fact into one layer, in the paper's steps.

``request`` (what to edit) → ``templates`` (context prefixes) → ``compute_key`` (k^u, k̄) →
``compute_value`` (v*) → ``update`` (ΔW, the one equation) → ``edit`` (diagnostics, apply,
restore); ``fast`` runs the same numbers with less work, ``mom2`` gives C, ``layer_choice``
picks the layer, ``guard`` checks an applied edit, ``hparams`` holds the defaults.
"""
