"""Data stages: synth, ingest, clip, crop, split, validate."""
