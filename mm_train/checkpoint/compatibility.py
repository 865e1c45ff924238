"""What a checkpoint must share with the run that resumes it, checked before anything is loaded:

- the model it holds: every field of the saved model configuration that decides what the weights mean
  (:data:`MODEL_FIELDS`) must equal the run's, even when the tensor shapes agree (4 heads of 16
  channels read as 8 heads of 8 would load silently and train a different model);
- its iteration: a checkpoint already at or past ``--train-iters`` leaves nothing to train
  (:func:`completed_iteration`).

The learning-rate schedule is compared by the scheduler itself when it loads
(:class:`mm_train.optim.ScaledParamScheduler`), and tensor shapes by each format.
The saved configuration is the manifest's ``config`` (:meth:`mm_train.config.RunConfig.record`);
a checkpoint without one (older, or not written by mm-train) is not compared.
"""

from __future__ import annotations

from mm_train.checkpoint.atomic import all_ranks_ok, iteration_dir, latest_iteration
from mm_train.checkpoint.manifest import read_manifest
from mm_train.errors import CheckpointError
from mm_train.features import flag
from mm_train.features.checkpointing import CheckpointConfig

# Per section of RunConfig.record(): the fields a checkpoint fixes. The model section: all of its
# fields but those that only shape training (dropout, initialisation, the sequence length and with it
# the default position count: a learned position table's size, like the vocabulary's, is checked with the
# tensor shapes).
MODEL_FREE_FIELDS = frozenset({"seq_length", "max_position_embeddings", "hidden_dropout", "attention_dropout",
                               "init_method_std", "initialization", "padded_vocab_size"})
MODEL_FIELDS = {
    "moe": ("num_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_grouped_gemm"),
    "data": ("tokenizer_type",),
}


def completed_iteration(checkpoint: CheckpointConfig, train_iters: int) -> int | None:
    """The iteration of the newest checkpoint under --load when it is at or past ``train_iters`` (training
    is complete: nothing to train, nothing to save); None otherwise, and always with --finetune (which
    starts at iteration 0)."""
    if not checkpoint.load or checkpoint.finetune:
        return None
    iteration = latest_iteration(checkpoint.load)
    return iteration if iteration is not None and iteration >= train_iters else None


def _described(name: str, value) -> str:
    if value is True:
        return flag(name)
    if value is False or value is None:
        return f"no {flag(name)}"
    return f"{flag(name)} {value}"


def _section_differences(section: str, saved: dict | None, run: dict | None) -> list[str]:
    if section == "moe" and (saved is None) != (run is None):  # a dense model against one with experts
        return [f"{_described('num_experts', (saved or {}).get('num_experts'))} in the checkpoint, "
                f"{_described('num_experts', (run or {}).get('num_experts'))} now"]
    if saved is None or run is None:
        return []
    names = [n for n in run if n not in MODEL_FREE_FIELDS] if section == "model" else MODEL_FIELDS[section]
    return [f"{_described(name, saved[name])} in the checkpoint, {_described(name, run[name])} now"
            for name in names if name in saved and name in run and saved[name] != run[name]]


def model_differences(saved: dict, run: dict) -> list[str]:
    """What differs between two configuration records in the fields a checkpoint fixes, as
    ``"--num-attention-heads 4 in the checkpoint, --num-attention-heads 8 now"``."""
    differences = []
    for section in ("model", *MODEL_FIELDS):
        differences += _section_differences(section, saved.get(section), run.get(section))
    return differences


def check_saved_model(root: str, run_record: dict) -> None:
    """Compares the model configuration saved with the newest checkpoint under ``root`` with the run's
    (``run_record``: :meth:`RunConfig.record`). Raises CheckpointError on every rank naming the first
    field that differs (collective); nothing when there is no checkpoint or no saved configuration."""
    error = None
    try:
        iteration = latest_iteration(root)
        directory = None if iteration is None else iteration_dir(root, iteration)
        manifest = read_manifest(directory) if directory is not None and directory.is_dir() else None
        saved = (manifest or {}).get("config")
        differences = model_differences(saved, run_record) if saved else []
        if differences:
            raise CheckpointError(f"{directory} holds another model than this run builds: {differences[0]}")
    except CheckpointError as failure:
        error = str(failure)
    all_ranks_ok(error)
