"""The lines Megatron-LM prints when it saves and loads a checkpoint (rank 0), so that tools reading
Megatron logs (e.g. the save path after "saving checkpoint at iteration ... to") read ours."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from mm_train.checkpoint.atomic import TRACKER
from mm_train.launch import print_rank_0


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")


def saving(iteration: int, root: str | Path, ckpt_format: str) -> None:
    """Before a save."""
    print_rank_0(f"[{_now()}] saving checkpoint at iteration {iteration:7d} to {root} in {ckpt_format} format")


def saved(iteration: int, root: str | Path, tp: int, pp: int) -> None:
    """After a save (the marker names it)."""
    print_rank_0(f"  [{_now()}] successfully saved checkpoint from iteration {iteration:7d} to {root} "
                 f"[ t 1/{tp}, p 1/{pp} ]")


def no_checkpoint(root: str | Path) -> None:
    """--load names a directory without a checkpoint: training starts from scratch."""
    print_rank_0(f"WARNING: could not find the metadata file {Path(root) / TRACKER}")
    print_rank_0("    will not load any checkpoints and will start from random")


def loading(root: str | Path, iteration: int) -> None:
    """Before the files of ``iteration`` are read."""
    print_rank_0(f" loading checkpoint from {root} at iteration {iteration}")


def loaded(root: str | Path, iteration: int, tp: int, pp: int) -> None:
    """After the model (and what else was asked for) is restored; ``iteration`` is where training goes on."""
    print_rank_0(f"  successfully loaded checkpoint from {root} [ t 1/{tp}, p 1/{pp} ] at iteration {iteration}")
