"""The trainer (the only code that drives DeepSpeed) and what it runs on:
plan, DeepSpeed config, meters, trackers, preemption, divergence."""
