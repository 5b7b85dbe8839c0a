"""Per-frame analyzers that several recipes add to the render pass (face parsing: nerf, avatar, mmvox)."""
