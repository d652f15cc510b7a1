"""A trained reward model on new rows: `bigrm score` and `bigrm eval`."""
