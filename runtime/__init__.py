"""The runtime: reads a build directory written by the compiler, trains and evaluates.

Three layers, each importing only the ones above it:

  contract/  what the compiler and the runtime share (stdlib and pydantic only)
  core/      the machinery every stage uses: processes and devices, backends, the shared loop,
             checkpoints, models, losses, the frozen reference, stage outputs, data
  stages/    one file per stage kind and the registry the run dispatches on

and the entry points: `train` (python -m runtime.train BUILD), `evaluate`, `chat`, `report`.
"""
