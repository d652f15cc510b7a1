"""Rows → validated examples → scored token sequences → the token store and cache → packed micro-batches."""
