"""Helpers with no Beam transforms in them, tested without a pipeline.

Media probing, crop geometry, per-frame features, the host policy, prefetching.
"""
