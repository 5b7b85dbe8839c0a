"""The spine's stages: plan, track, render, filter here; inputs in sources/, outputs in writers/.

core/ and lib/ below them hold what every layer uses; analyzers/ the per-frame analyzers recipes share.
"""
