"""Experiments as data (variants x seeds x search spaces), their validation, and the results of finished trials."""
