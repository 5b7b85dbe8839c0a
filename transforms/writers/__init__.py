"""Writers that lay out a recipe's output (per-subject or per-tube folders; shards are transforms/write.py)."""
