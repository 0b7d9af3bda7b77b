"""Joining Ray and sharing its CPUs and GPUs between crome's workers.

``connect`` starts a local Ray (or joins ``address``: ``auto`` or ``HOST:PORT``), passing crome's
environment (cache folder, data folder, device) on to the workers. ``placement`` says what one
worker asks Ray for: a GPU each when the cluster has GPUs, else an even share of the CPUs, with
torch's threads set to that share so that N workers never oversubscribe the cores.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..errors import CromeError

ENV_PREFIXES = ("CROME_", "HF_", "TRANSFORMERS_")


def ray_module():
    try:
        import ray
    except ImportError:
        raise CromeError("--workers and crome sweep need Ray: pip install 'crome[ray]'") from None
    return ray


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def connect(address: str | None = None, num_cpus: int | None = None):
    """The ``ray`` module, initialised: an existing connection is kept, else a local instance is
    started (``num_cpus``: default all), or the cluster at ``address`` joined."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": _env()}
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level=logging.ERROR)
        else:
            ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.ERROR)
    except ConnectionError as exc:
        raise CromeError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
    return ray


@dataclass(frozen=True)
class Placement:
    """What one worker asks Ray for, and the torch threads it uses."""

    num_cpus: int
    num_gpus: float
    threads: int

    def options(self) -> dict:
        return dict(num_cpus=self.num_cpus, num_gpus=self.num_gpus)


def placement(ray, workers: int, threads: int | None = None, device_map: str | None = None) -> Placement:
    """Split the cluster between ``workers``: one GPU each (all of them for ``device_map='auto'``
    shared out evenly), else ``threads`` CPUs each (default: the CPUs divided evenly). Asking for
    more than the cluster has is an error, not a wait."""
    if workers < 1:
        raise CromeError("--workers must be at least 1")
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    use_gpu = gpus > 0 and os.environ.get("CROME_DEVICE", "cuda").startswith("cuda")
    if use_gpu:
        per = gpus // workers if device_map else 1
        if per < 1 or per * workers > gpus:
            raise CromeError(f"--workers {workers} needs {workers} GPUs; the Ray cluster has {gpus}")
        return Placement(num_cpus=1, num_gpus=per, threads=threads or max(1, cpus // workers))
    threads = threads or max(1, cpus // workers)
    if threads * workers > cpus:
        raise CromeError(f"--workers {workers} with {threads} thread(s) each needs {threads * workers} CPUs; "
                         f"the Ray cluster has {cpus}")
    return Placement(num_cpus=threads, num_gpus=0, threads=threads)
