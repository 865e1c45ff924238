"""What a checkpoint restores besides model and optimizer: the position in training and the RNG states."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from mm_train.errors import CheckpointError
from mm_train.launch import device_type


@dataclass
class TrainingState:
    """The iteration reached and the training samples consumed (the data position)."""

    iteration: int = 0
    consumed_train_samples: int = 0


def rng_state(tracker=None) -> dict:
    """Python, numpy, torch and accelerator (``cuda`` or ``npu``, this process's device) RNG states, plus
    ``tracker.get_states()`` when a Megatron RNG tracker is given (its model-parallel states: dropout
    inside tensor-parallel regions); tensors and plain values only (loadable with weights_only)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py_version, list(py_state), py_gauss],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if tracker is not None:
        state["tracker"] = tracker.get_states()
    accelerator = device_type()
    if accelerator != "cpu":
        state[accelerator] = getattr(torch, accelerator).get_rng_state()
    return state


def set_rng_state(state: dict, tracker=None) -> None:
    """Restores what :func:`rng_state` returned; with ``tracker``, its states too (CheckpointError
    when the saved state has none)."""
    if tracker is not None and "tracker" not in state:
        raise CheckpointError("the checkpoint has no RNG tracker states; pass --no-load-rng")
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if tracker is not None:
        tracker.set_states(state["tracker"])
    accelerator = device_type()
    if accelerator in state:
        getattr(torch, accelerator).set_rng_state(state[accelerator])
