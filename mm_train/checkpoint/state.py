"""What a checkpoint restores besides model and optimizer: the position in training and the RNG states
(in Megatron's layout), and the reading of a checkpoint file with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mm_train.errors import CheckpointError, first_line
from mm_train.launch import device_type


@dataclass
class TrainingState:
    """The iteration reached and the training samples consumed (the data position)."""

    iteration: int = 0
    consumed_train_samples: int = 0


def read_file(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, allowing the classes megatron-core allows in its
    checkpoints (argparse.Namespace, numpy arrays of RNG states, megatron's enums); CheckpointError naming
    the file when it cannot be read."""
    from megatron.core.safe_globals import SAFE_GLOBALS

    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: unreadable ({type(error).__name__}: {first_line(error)})") from None


def rng_state(tracker=None) -> dict:
    """Megatron's RNG state of this process: ``random_rng_state``, ``np_rng_state``, ``torch_rng_state``,
    ``cuda_rng_state`` (the accelerator's, CUDA or NPU, when there is one) and, with a Megatron RNG
    ``tracker``, ``rng_tracker_states`` (its model-parallel states: dropout inside tensor-parallel regions)."""
    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state()}
    accelerator = device_type()
    if accelerator != "cpu":
        state["cuda_rng_state"] = getattr(torch, accelerator).get_rng_state()
    if tracker is not None:
        state["rng_tracker_states"] = tracker.get_states()
    return state


def check_rng_state(state: dict, tracker=None) -> None:
    """CheckpointError when ``state`` (see :func:`rng_state`) is incomplete or its tracker states do not fit
    ``tracker`` (another kind of device or layout)."""
    keys = ("random_rng_state", "np_rng_state", "torch_rng_state")
    if not isinstance(state, dict) or any(key not in state for key in keys):
        raise CheckpointError("the checkpoint's RNG state is incomplete; resume with --no-load-rng")
    if tracker is None:
        return
    saved = state.get("rng_tracker_states")
    if saved is None:
        raise CheckpointError("the checkpoint has no RNG tracker states; resume with --no-load-rng")
    for name, current in tracker.get_states().items():
        if name not in saved or saved[name].numel() != current.numel():
            raise CheckpointError("the checkpoint's RNG states come from another device type or layout; resume "
                                  "with --no-load-rng")


def set_rng_state(state: dict, tracker=None) -> None:
    """Restores what :func:`rng_state` returned (CheckpointError, before anything is set, when the state
    is incomplete or from another kind of device); with ``tracker``, its states too."""
    check_rng_state(state, tracker)
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    accelerator = device_type()
    if "cuda_rng_state" in state and accelerator != "cpu":
        getattr(torch, accelerator).set_rng_state(state["cuda_rng_state"])
    if tracker is not None:
        tracker.set_states(state["rng_tracker_states"])
