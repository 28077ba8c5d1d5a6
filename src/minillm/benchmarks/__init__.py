"""Benchmarks: `performance` measures training and generation speed against transformers (`minillm bench`);
`race` times our training recipe against the plain one to the same validation loss (`minillm bench race`)."""
