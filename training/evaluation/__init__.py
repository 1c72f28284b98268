"""Evaluation and serving: held-out loss, long-context and downstream tasks, studies."""
