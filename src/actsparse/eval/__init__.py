"""Evaluation: variants, quality against the dense model, tasks, generation, weight-pruning
baselines, sweeps, FLOPs, hardware cost and the tables that report them."""
