"""Compression techniques: one file each, pure functions on top, a thin main() at the bottom."""
