"""Hybrid data parallelism as a program: whole documents, per-batch plans, the executor."""
