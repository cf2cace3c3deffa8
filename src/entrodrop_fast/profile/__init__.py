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
- :mod:`.presets` named configurations (``--preset paper``).

Imports point one way: ``ops``, ``models``, ``data`` <- ``profile`` <- ``prune`` <- ``evaluate``.
"""

from entrodrop_fast.profile.inmemory import ProfileSettings
from entrodrop_fast.profile.pipeline import Calibration, Memory, profile_model

__all__ = ["Calibration", "Memory", "ProfileSettings", "profile_model"]
