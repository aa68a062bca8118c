"""The per-worker training loop, without Ray: feeds, checkpoints, collectives."""
