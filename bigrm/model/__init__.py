"""The reward model over a packed row: backbone, segment-isolated attention, value heads, adapters, FLOPs."""
