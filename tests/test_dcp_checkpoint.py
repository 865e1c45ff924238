"""torch_dcp checkpoints: 2-rank FSDP2 save then resume (meta-device init, RNG restored) continues
the uninterrupted curve; loading at world size 1 into an unsharded model; atomicity and clear
errors for missing, partial and corrupt checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from mm_train.checkpoint.atomic import TRACKER, iteration_dir, latest_iteration
from mm_train.checkpoint.dcp import load_dcp_checkpoint, save_dcp_checkpoint
from mm_train.errors import CheckpointError
from mm_train.features.fsdp2 import FSDP2Config, apply_fsdp2, build_fsdp2_model_on_meta
from mm_train.model.init import init_parameters_
from tests.distributed import run_ranks
from tests.toy_transformer import ToyTransformer, global_rng_batch, keyed_batch, keyed_full_value, train

INIT = keyed_full_value(seed=99)
CONFIG = FSDP2Config(sub_modules_to_wrap=("layers.*",), num_to_forward_prefetch=1, num_to_backward_prefetch=1)
STEPS, SAVE_AT, BATCH = 6, 3, 4

# DCP warns that it saves/loads "in a single process" whenever no process group exists.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def adamw_with_schedule(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def saving_run(model, checkpoint_dir, batch_for_step, rank=0, world_size=1) -> list[float]:
    """STEPS uninterrupted steps, saving a checkpoint after step SAVE_AT (iteration SAVE_AT)."""
    optimizer, scheduler = adamw_with_schedule(model)

    def save(step):
        if step + 1 == SAVE_AT:
            save_dcp_checkpoint(checkpoint_dir, SAVE_AT, model, optimizer, scheduler=scheduler,
                                consumed_samples=SAVE_AT * BATCH, extra={"note": "toy"})

    return train(model, optimizer, range(STEPS), batch_for_step, scheduler, rank, world_size, after_step=save)


def resumed_run(model, checkpoint_dir, batch_for_step, rank=0, world_size=1, load_rng=True) -> list[float]:
    """Loads the latest checkpoint into ``model`` and trains the remaining steps."""
    optimizer, scheduler = adamw_with_schedule(model)
    loaded = load_dcp_checkpoint(checkpoint_dir, model, optimizer, scheduler=scheduler, load_rng=load_rng)
    assert (loaded.iteration, loaded.consumed_samples, loaded.extra) == (SAVE_AT, SAVE_AT * BATCH, {"note": "toy"})
    return train(model, optimizer, range(loaded.iteration, STEPS), batch_for_step, scheduler, rank, world_size)


def check_resume_on_two_ranks(rank: int, world_size: int, tmp_path) -> None:
    # Data from the global RNG: the resumed run sees the same batches only if RNG state is restored.
    torch.manual_seed(0)
    model = apply_fsdp2(init_parameters_(ToyTransformer(), INIT), CONFIG)
    uninterrupted = saving_run(model, tmp_path / "rng_data", global_rng_batch, rank, world_size)
    assert uninterrupted[-1] < uninterrupted[0]
    torch.manual_seed(12345)
    fresh = build_fsdp2_model_on_meta(ToyTransformer, CONFIG, keyed_full_value(seed=7), "cpu")
    resumed = resumed_run(fresh, tmp_path / "rng_data", global_rng_batch, rank, world_size)
    torch.testing.assert_close(resumed, uninterrupted[SAVE_AT:], rtol=1e-4, atol=0)

    # Step-keyed data, for the world-size-1 resume in the parent process.
    model = apply_fsdp2(init_parameters_(ToyTransformer(), INIT), CONFIG)
    curve = saving_run(model, tmp_path / "keyed_data", keyed_batch, rank, world_size)
    if rank == 0:
        (tmp_path / "keyed_curve.json").write_text(json.dumps(curve))


@pytest.mark.distributed
def test_fsdp2_save_resume_and_reshard_to_one_process(tmp_path):
    run_ranks(check_resume_on_two_ranks, 2, tmp_path, timeout=180)
    uninterrupted = json.loads((tmp_path / "keyed_curve.json").read_text())
    checkpoint_dir = tmp_path / "keyed_data"
    assert latest_iteration(checkpoint_dir) == SAVE_AT
    assert not iteration_dir(checkpoint_dir, SAVE_AT).with_name(f"iter_{SAVE_AT:07d}.tmp").exists()
    model = ToyTransformer()
    with pytest.raises(CheckpointError, match="world size 2, loading at 1.*--no-load-rng"):
        load_dcp_checkpoint(checkpoint_dir, model, None)
    resumed = resumed_run(model, checkpoint_dir, keyed_batch, load_rng=False)
    torch.testing.assert_close(resumed, uninterrupted[SAVE_AT:], rtol=1e-4, atol=0)


def test_single_process_resume_continues_curve(tmp_path):
    torch.manual_seed(0)
    uninterrupted = saving_run(init_parameters_(ToyTransformer(), INIT), tmp_path, global_rng_batch)
    torch.manual_seed(1)
    resumed = resumed_run(ToyTransformer(), tmp_path, global_rng_batch)
    torch.testing.assert_close(resumed, uninterrupted[SAVE_AT:], rtol=1e-4, atol=0)


@pytest.fixture
def saved(tmp_path):
    """A single-process checkpoint at iteration 2 (model + optimizer + RNG); returns its directory."""
    model = init_parameters_(ToyTransformer(), INIT)
    optimizer, _ = adamw_with_schedule(model)
    train(model, optimizer, range(2), keyed_batch)
    save_dcp_checkpoint(tmp_path, 2, model, optimizer, consumed_samples=8)
    return tmp_path


def load_into_fresh(checkpoint_dir, **kwargs):
    model = ToyTransformer()
    return load_dcp_checkpoint(checkpoint_dir, model, adamw_with_schedule(model)[0], **kwargs)


def test_save_overwrites_iteration_and_moves_marker_last(saved):
    model = init_parameters_(ToyTransformer(), INIT)
    save_dcp_checkpoint(saved, 2, model, None, save_rng=False, consumed_samples=16)
    assert load_into_fresh(saved, load_optim=False, load_rng=False).consumed_samples == 16
    save_dcp_checkpoint(saved, 5, model, None, save_rng=False)
    assert latest_iteration(saved) == 5 and (saved / "iter_0000002").is_dir()
    assert sorted(p.name for p in saved.iterdir()) == ["iter_0000002", "iter_0000005", TRACKER]


def test_leftover_temp_dir_is_ignored(saved):
    (saved / "iter_0000003.tmp").mkdir()
    assert load_into_fresh(saved).iteration == 2


def test_no_marker_means_fresh_start(tmp_path):
    assert latest_iteration(tmp_path) is None
    model = init_parameters_(ToyTransformer(), INIT)
    before = {name: p.clone() for name, p in model.named_parameters()}
    assert load_dcp_checkpoint(tmp_path, model, None) is None
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_garbled_marker(saved):
    (saved / TRACKER).write_text("latest\n")
    with pytest.raises(CheckpointError, match="should hold an iteration number"):
        load_into_fresh(saved)


def test_marker_names_missing_iteration(saved):
    (saved / TRACKER).write_text("7\n")
    with pytest.raises(CheckpointError, match="iter_0000007: checkpoint directory does not exist"):
        load_into_fresh(saved)


@pytest.mark.parametrize("removed", [".metadata", "common.pt"])
def test_partial_checkpoint_reported(saved, removed):
    (iteration_dir(saved, 2) / removed).unlink()
    with pytest.raises(CheckpointError, match=f"incomplete checkpoint, missing.*{removed}"):
        load_into_fresh(saved)


def test_truncated_shard_reported(saved):
    shard = next(iteration_dir(saved, 2).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    with pytest.raises(CheckpointError, match=f"{shard.name} is truncated or changed"):
        load_into_fresh(saved)


def test_flipped_bytes_in_a_shard_are_reported_naming_it(saved):
    shard = next(iteration_dir(saved, 2).glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(data)
    with pytest.raises(CheckpointError, match=f"{shard.name} is corrupt: its SHA-256 differs"):
        load_into_fresh(saved)


def test_the_manifest_lists_every_file(saved):
    directory = iteration_dir(saved, 2)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert (manifest["format"], manifest["iteration"]) == ("torch_dcp", 2)
    assert set(manifest["files"]) == {p.name for p in directory.iterdir()} - {"manifest.json"}


def test_garbage_common_file_reported(saved):
    (iteration_dir(saved, 2) / "common.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="common.pt: unreadable"):
        load_into_fresh(saved)


def test_missing_parts_need_no_load_flags(saved):
    model = init_parameters_(ToyTransformer(), INIT)
    save_dcp_checkpoint(saved, 4, model, None, save_rng=False)
    with pytest.raises(CheckpointError, match="without optimizer state.*--no-load-optim"):
        load_into_fresh(saved, load_rng=False)
    with pytest.raises(CheckpointError, match="without RNG state.*--no-load-rng"):
        load_into_fresh(saved, load_optim=False)
    loaded_model = ToyTransformer()
    load_dcp_checkpoint(saved, loaded_model, None, load_rng=False)
    for name, param in loaded_model.named_parameters():
        assert torch.equal(param, dict(model.named_parameters())[name]), name


def test_unreadable_rng_file_reported(saved):
    (iteration_dir(saved, 2) / "rng_rank_0.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="rng_rank_0.pt is truncated or changed"):
        load_into_fresh(saved)
