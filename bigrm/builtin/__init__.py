"""What ships inside bigrm: the synthetic tasks and the tiny model of the embedded default."""
