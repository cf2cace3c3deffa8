"""Stage 2 of the pipeline: rank the blocks, plan the drop, remove the blocks, save the model.

The entry point is :func:`prune_model` (:mod:`.pipeline`). Inside:

- :mod:`.ranking` orders blocks by a profile's scores and makes a drop plan (protection
  rules, iterative re-scoring);
- :mod:`.surgery` removes blocks from a loaded model and rewrites its config;
- :mod:`.export` writes a pruned checkpoint from the source model (never modified) and loads it.

It imports from ``profile`` (the report), never from ``evaluate``.
"""

from entrodrop_fast.prune.pipeline import prune_model

__all__ = ["prune_model"]
