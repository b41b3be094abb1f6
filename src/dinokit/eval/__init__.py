"""Evaluation protocols on frozen features: k-NN (and the probes built beside it)."""
