"""Ray adapters: the cluster connection, the Ray Train TorchTrainer, Ray Tune sweeps, and local sweeps without Ray."""
