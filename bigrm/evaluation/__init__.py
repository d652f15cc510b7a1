"""Rewards of held-out data → metrics, diagnostics and the eval report."""
