"""Distribution: crome's runs on Ray (``pip install 'crome[ray]'``).

* ``cluster``: joining Ray and sharing CPUs/GPUs between workers;
* ``workers``: ``crome eval --workers N``, one run's cases on N workers, one writer;
* ``sweep``: ``crome sweep SPEC.toml``, a grid of runs, one Ray task per cell;
* ``run``: ``crome eval``'s choice between this process and Ray workers.
"""
