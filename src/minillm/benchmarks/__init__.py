"""Benchmarks: `performance` measures training and generation speed against transformers (`minillm bench`)."""
