"""A run's plumbing: the work dir, checkpoints, metrics, command-line errors, and the `Trainer` that
assembles data, model, training and decoding for train.py."""
