"""ProCo and the baselines: losses (the paper's equations), the sample queue, networks, the method registry."""
