"""Rewards → loss: the ranking loss, the PRM step loss, the attribute rating term and their total."""
