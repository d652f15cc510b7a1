"""What several test modules share: paths, tiny models and groups, launched runs, a fake Slurm, real tokenizers."""
