"""ProCo and the baselines: losses (the paper's equations), the sample queue, networks, and the method
registry, which the imports below fill."""

from proco_ray.method import baselines, proco  # noqa: F401  (registration)
