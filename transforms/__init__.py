"""PTransforms and DoFns for each stage: manifest, download, plan, crop, render, write."""
