"""Pass: measure one training step on fake tensors, as ``revify.measure`` measures a real one.

The model and inputs are fake copies (``fake_copy``): the step runs the same kernels on shapes
alone, so the saved, retained and peak bytes are those of the real step and nothing is
allocated. The RNG is forked (a fake step must not move the user's seed) and transformers'
attention masks take the path they take on real tensors (``fake_transformers``). Not timed.

Before::

    fake_copy(model, mode), fake_inputs(inputs, mode)

After::

    StepMeasurement(saved_bytes=…, peak_bytes=…, step_time_s=None, …)
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from revify.measure import StepMeasurement, measure_training_memory, profile_to_measurement
from revify.passes.prediction.fake_transformers import real_mask_path


def measure_fake_step(model: nn.Module, inputs: Any, loss_fn: Callable[[Any], torch.Tensor], paths: Sequence[str],
                      mode: FakeTensorMode) -> StepMeasurement:
    """One forward + loss + backward of fake ``model`` on fake ``inputs`` inside ``mode``, saved bytes by ``paths``."""
    with torch.random.fork_rng(devices=[]), mode, real_mask_path(inputs):
        return profile_to_measurement(measure_training_memory(model, inputs, loss_fn, paths))
