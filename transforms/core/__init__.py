"""The bottom layer: element types, output and work-dir paths, atomic file writes, per-clip frame archives."""
