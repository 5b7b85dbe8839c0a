"""Outputs: WebDataset shards, published folder units (per subject or per tube), and the run's summary."""
