"""The automatic parallel plan: from a model, a length and a machine to a mesh, a context
strategy and memory settings (docs/planning.md).

  hardware.py   device profiles (data-sheet figures with sources; `calibrate` measures this one)
  workload.py   what one step of the configured model does: parameters, FLOPs, activations
  estimate.py   a candidate's modelled per-device memory and step time on a profile
  search.py     the candidates (mesh factorisations x strategies x memory settings), pruned
                and ranked

Compiling the survivors' real train step (their compiled memory) needs the training program
and lives in `training/autoplan.py`; this package only models.
"""
