"""Where Ray runs: the cluster this process belongs to, or a local one."""

from __future__ import annotations

import ray


def connect_or_start_ray(num_cpus: int | None = None, join_existing: bool = True) -> bool:
    """Join the cluster this process belongs to (`ray submit`, `ray job submit`, RAY_ADDRESS) or start a local one.

    `join_existing=False` always starts a fresh local Ray (the one-machine demo).
    Returns True when a local Ray was started here.
    """
    if ray.is_initialized():
        return False
    if join_existing:
        try:
            ray.init(address="auto", log_to_driver=True)
            return False
        except ConnectionError:
            pass
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    return True
