"""Datasets as downloaded -> splits -> resized, encoded Parquet shards + manifest -> the Ray Data training input."""
