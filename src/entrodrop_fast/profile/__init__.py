"""Stage 1 of the pipeline: profile a model's blocks on calibration windows.

The entry point is :func:`profile_model` (:mod:`.pipeline`): model source -> calibration
windows -> one tapped forward pass -> report. Inside:

- :mod:`.taps` hooks on the residual stream around each attention / MLP block and decoder
  layer, feeding the streaming estimator states;
- :mod:`.inmemory` runs the whole model (settings, batching, merging, the result);
- :mod:`.layerwise` runs a checkpoint one decoder layer at a time (models larger than memory);
- :mod:`.distributed` merges the states of several processes;
- :mod:`.report` turns a result into the report (entropy per block, stage 1, ranking input);
- :mod:`.massive` diagnoses massive activations of the residual stream;
- :mod:`.presets` named configurations (``--preset paper``);
- :mod:`.methods` the method names (no torch).

Imports point one way: ``ops``, ``models``, ``data`` <- ``profile`` <- ``prune`` <- ``evaluate``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from entrodrop_fast.profile.inmemory import ProfileSettings
    from entrodrop_fast.profile.pipeline import Calibration, Memory, profile_model

__all__ = ["Calibration", "Memory", "ProfileSettings", "profile_model"]

# the public names are imported on first use: importing a torch-free part of the package
# (.methods, for the command-line parsers) does not import torch
_HOME = {
    "Calibration": "pipeline",
    "Memory": "pipeline",
    "ProfileSettings": "inmemory",
    "profile_model": "pipeline",
}


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
