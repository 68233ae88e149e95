"""AFIF engine: models from specs, families, penalties, curvature operators, solvers.

Pure PyTorch; imports nothing of ours outside `engine/`. See docs/engine-api.md.
"""
