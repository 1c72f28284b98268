"""Hybrid data parallelism (ByteScale, Ge et al., 2025): the per-batch host planner
(`planner.py`: which devices share which document) and the pool's groups as a context axis
(`groups.py`: ring attention and recurrences per group). The train step that runs a plan is a
`TrainProgram` in `training/hybrid/executor.py`; nothing here imports `training/`."""
