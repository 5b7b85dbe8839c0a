"""Talking-face dataset pipeline: manifest to WebDataset shards on Apache Beam."""
