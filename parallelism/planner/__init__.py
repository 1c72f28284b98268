"""The automatic parallel plan: from a model, a length and a machine to a mesh, a context
strategy and memory settings (docs/planning.md).

  hardware.py   device profiles (data-sheet figures with sources; training/calibration.py
                measures this machine, its kernels and its context-parallel layouts)
  workload.py   what one step of the configured model does: parameters, FLOPs, activations
  estimate.py   a candidate's modelled per-device memory and step time on a profile
  search.py     the candidates (mesh factorisations x strategies x memory settings), pruned
                and ranked
  documents.py  planning for a length distribution: static meshes charged their busiest
                device's pairs, hybrid data parallelism from the hybrid-DP planner's own plan

Compiling the survivors' real train step (their compiled memory) needs the training program
and lives in `training/autoplan.py`; this package only models.
"""
