"""The multimodal engine: a Hugging Face vision-language model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Qwen3-VL-MoE) from MindSpeed-MM's configurations, sharded with FSDP2 over all ranks.

- Model: :mod:`mm_train.model.hf` builds it (weights of the Hugging Face directory, or random;
  frozen parts; mm_kernels' fused kernels through ``apply_fused_kernels``; on the meta device with
  ``--init-model-with-meta-device``) and shards it per the FSDP2 settings; ``--bf16`` is FSDP2's
  compute dtype.
- Data: :mod:`mm_train.data.mllm`; the multimodal rotary positions are computed here for the whole
  sequence (``get_rope_index`` with the image tokens' type ids).
- Context parallel: ranks r*C .. r*C+C-1 form a CP group holding one data-parallel replica's
  batches; the text decoder runs on S/C tokens per rank with Ulysses attention
  (:mod:`mm_train.model.hf.context_parallel`). The per-token losses of the group are gathered so
  every CP rank computes the whole objective, as the GPT path does.
- Loss: the loss mode of ``--calculate-per-sample-loss`` / ``--calculate-per-token-loss``
  (:mod:`mm_train.loss`) over labels that are -100 outside the answers; micro-batches accumulate
  gradients; FSDP2 averages them over all ranks.
- Checkpoints: ``torch_dcp`` (model, optimizer, schedule, RNG) with a Hugging Face directory
  ``hf/`` inside every saved iteration (:mod:`mm_train.model.hf.export`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mm_kernels.parallel import ULYSSES, new_cp_groups, shard_for_rank
from mm_train.checkpoint.atomic import latest_iteration
from mm_train.checkpoint.compatibility import check_saved_model
from mm_train.checkpoint.dcp import load_dcp_checkpoint, save_dcp_checkpoint
from mm_train.checkpoint.state import TrainingState
from mm_train.config import RunConfig
from mm_train.data.mllm import MllmData, load_image_processor, load_tokenizer
from mm_train.data.mllm.template import IGNORE_INDEX, IMAGE_PAD, VISION_END, VISION_START
from mm_train.engines.base import Engine, StepResult
from mm_train.engines.fsdp2 import FSDP2Optimizer
from mm_train.errors import DataError
from mm_train.features.context_parallel import gather_sequence
from mm_train.launch import Launch, print_rank_0
from mm_train.loss import micro_batch_loss
from mm_train.model.hf.build import build_model
from mm_train.model.hf.context_parallel import TextModelEntry, register_ulysses_attention
from mm_train.model.hf.export import write_hf_directory
from mm_train.optim import build_scheduler, build_torch_optimizer, learning_rate

HF_DIRECTORY = "hf"
_TOKEN_IDS = ((IMAGE_PAD, "image_token_id"), (VISION_START, "vision_start_token_id"), (VISION_END, "vision_end_token_id"))


def _print0(text: str) -> None:
    print_rank_0(f"mm-train: {text}")


def _check_tokens(tokenizer, hf_config: dict, path: str) -> None:
    """The tokenizer's vision tokens must be the ids the model was configured with."""
    for token, key in _TOKEN_IDS:
        expected, found = hf_config.get(key), tokenizer.convert_tokens_to_ids(token)
        if expected is not None and expected != found:
            raise DataError(f"{path}: the tokenizer's {token} is id {found}, the model's {key} is {expected}")
    vocabulary = hf_config["text_config"]["vocab_size"]
    if len(tokenizer) > vocabulary:
        raise DataError(f"{path}: the tokenizer has {len(tokenizer)} tokens, the model's vocabulary only {vocabulary}")


class HFEngine(Engine):
    """A Hugging Face vision-language model on FSDP2 (see the module doc)."""

    def __init__(self, config: RunConfig, launch: Launch) -> None:
        self.config = config
        self.launch = launch
        multimodal = config.multimodal
        seed = config.training.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        world, cp = launch.world_size, config.context_parallel.size
        self.cp_size, self.cp_rank = cp, launch.rank % cp
        self.dp_size, self.dp_rank = world // cp, launch.rank // cp
        self.dp_group = None
        for first in range(cp):
            group = dist.new_group(list(range(first, world, cp)), timeout=config.parallel.timeout)
            self.dp_group = group if first == self.cp_rank else self.dp_group
        text_attention = multimodal.model.text_attention
        self.cp_groups = None
        if cp > 1:
            self.cp_groups = new_cp_groups([list(range(start, start + cp)) for start in range(0, world, cp)], ULYSSES,
                                           cp, timeout=config.parallel.timeout)
            text_attention = register_ulysses_attention(self.cp_groups)
        data = multimodal.data
        self.tokenizer = load_tokenizer(data)
        self.image_processor = load_image_processor(data)
        _check_tokens(self.tokenizer, multimodal.model.hf_config, data.model_name_or_path)
        self.data_set = MllmData(data, self.tokenizer, self.image_processor, config.model.seq_length, seed)
        if self.data_set.skipped:
            _print0(f"skipped {self.data_set.skipped} record(s) whose roles do not alternate prompt and answer "
                    f"(first: {self.data_set.first_skipped})")
        self.model, report = build_model(multimodal.model, config.fsdp2.sharding, launch.device,
                                         meta=config.fsdp2.init_model_with_meta_device, seed=seed,
                                         text_attention=text_attention, fused=multimodal.fused)
        if report is not None:
            counts = ", ".join(f"{kind} {n}" for kind, n in sorted(report.counts().items())) or "none"
            _print0(f"fused kernels: {counts} module(s) of {report.model_class}")
        self.entry = TextModelEntry(self.model, cp, self.cp_rank)
        self.image_token_id = self.model.config.image_token_id
        self.optimizer = FSDP2Optimizer(build_torch_optimizer(config.optimizer, self.model.named_parameters(),
                                                              launch.device_type),
                                        config.optimizer.clip_grad)
        self.scheduler = build_scheduler(config.optimizer, config.training, self.optimizer)
        self.aux_loss_coef = multimodal.model.router_aux_loss_coef if "num_experts" in multimodal.model.text_config \
            else 0.0

    # ---- batches and losses ------------------------------------------------------------------------

    def _forward(self, batch: dict, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(value, divisor, report, aux loss) of one micro-batch (see :func:`mm_train.loss.micro_batch_loss`)."""
        device = self.launch.device
        input_ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        grid = batch["image_grid_thw"].to(device) if batch["image_grid_thw"].shape[0] else None
        pixels = batch["pixel_values"].to(device) if grid is not None else None
        types = (input_ids == self.image_token_id).int()
        positions, _ = self.model.model.get_rope_index(input_ids, types, image_grid_thw=grid,
                                                       attention_mask=batch["attention_mask"].to(device))
        self.entry.blank_vision = grid is None
        extra = {"output_router_logits": True} if self.aux_loss_coef else {}
        output = self.model(input_ids=input_ids, pixel_values=pixels, image_grid_thw=grid, position_ids=positions,
                            use_cache=False, **extra)
        if self.cp_size > 1:
            labels = shard_for_rank(labels, ULYSSES, self.cp_size, self.cp_rank, self.cp_size, 1)
        logits = output.logits.float()
        token_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="none").view_as(labels)
        loss_mask = (labels != IGNORE_INDEX).float()
        if self.cp_size > 1:
            token_loss = gather_sequence(token_loss, self.cp_groups.cp)
            loss_mask = gather_sequence(loss_mask, self.cp_groups.cp)
        value, divisor, report = micro_batch_loss(mode, loss_mask, token_loss)
        aux = output.aux_loss if self.aux_loss_coef and output.aux_loss is not None else torch.zeros((), device=device)
        return value, divisor, report["lm loss"], aux

    def _global_tokens(self, batches: list[dict]) -> float:
        count = torch.tensor([float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches))],
                             dtype=torch.float64, device=self.launch.device)
        dist.all_reduce(count, group=self.dp_group)
        return max(count.item(), 1.0)

    def _reduce(self, total: torch.Tensor) -> float:
        dist.all_reduce(total, group=self.dp_group)
        return (total[0] / total[1].clamp(min=1e-12)).item()

    def _run(self, data: Iterator[dict], backward: bool) -> tuple[float, int, float]:
        """Forward (and backward) over this rank's micro-batches of the next global batch: the objective,
        the padded sequence length and the mean aux loss."""
        training = self.config.training
        mode = training.loss_mode
        batches = [next(data) for _ in range(training.micro_batches)]
        per_token_scale = self.dp_size / self._global_tokens(batches) if mode == "per_token" and backward else None
        # Sums kept on the device: one host sync per step (in _reduce), none per micro-batch.
        total = torch.zeros(2, dtype=torch.float64, device=self.launch.device)
        aux_total = torch.zeros((), dtype=torch.float64, device=self.launch.device)
        for batch in batches:
            value, divisor, report, aux = self._forward(batch, mode)
            total += report.detach().double()
            aux_total += aux.detach().double()
            if backward:
                if per_token_scale is not None:
                    loss = value * per_token_scale
                else:
                    loss = value / divisor.clamp(min=1).to(value.device) / len(batches)
                (loss + self.aux_loss_coef * aux / len(batches)).backward()
        return self._reduce(total), batches[0]["input_ids"].shape[1], aux_total.item() / len(batches)

    # ---- the engine interface ----------------------------------------------------------------------

    def load(self) -> TrainingState:
        """The newest torch_dcp checkpoint under --load when there is one (any world size; RNG states only
        at the saved one), once its saved model configuration matched this run's; --finetune loads the
        weights only. Without one the model keeps its weights from the Hugging Face directory, or starts
        random with a warning."""
        options = self.config.checkpoint
        if not options.load or latest_iteration(options.load) is None:
            if self.config.multimodal.model.weights_path is None:
                _print0(f"warning: no weights (no safetensors in {self.config.multimodal.data.model_name_or_path}, "
                        "no checkpoint under --load): the model starts from random values")
            return TrainingState()
        check_saved_model(options.load, self.config.record())
        loaded = load_dcp_checkpoint(options.load, self.model, self.optimizer.optimizer, scheduler=self.scheduler,
                                     load_optim=options.load_optim and not options.finetune,
                                     load_rng=options.load_rng and not options.finetune)
        if options.finetune:
            return TrainingState()
        return TrainingState(loaded.iteration, loaded.consumed_samples)

    def data(self, state: TrainingState) -> tuple[Iterator[dict], Iterator[dict] | None]:
        """Micro-batches of this data-parallel rank (every rank of a CP group gets the same ones)."""
        return self.data_set.iterators(self.config.data, state.consumed_train_samples, self.dp_rank, self.dp_size)

    def train_step(self, data: Iterator[dict]) -> StepResult:
        """One iteration: forward/backward over the global batch, optimizer and schedule step."""
        training = self.config.training
        self.optimizer.zero_grad()
        loss, length, aux = self._run(data, backward=True)
        updated, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=training.global_batch_size)
        aux_losses = {"load_balancing_loss": aux} if self.aux_loss_coef else {}
        return StepResult(loss=loss, grad_norm=grad_norm, updated=updated, tokens=training.global_batch_size * length,
                          aux_losses=aux_losses)

    def evaluate(self, data: Iterator[dict], iterations: int) -> float:
        """Mean objective over ``iterations`` global batches, without updates."""
        self.model.eval()
        with torch.no_grad():
            values = [self._run(data, backward=False)[0] for _ in range(iterations)]
        self.model.train()
        return sum(values) / len(values)

    def learning_rate(self) -> float:
        """The schedule's learning rate (before any --lr-mult)."""
        return learning_rate(self.optimizer)

    def floating_point_operations(self) -> None:
        """None: Megatron's count is a GPT's at --seq-length; a vision-language step's depends on its images
        and its sequences' lengths (--log-throughput is named without effect at start-up)."""
        return None

    def save(self, state: TrainingState) -> Path:
        """A torch_dcp checkpoint of ``state.iteration`` under --save, with the Hugging Face directory ``hf/``."""
        options = self.config.checkpoint
        multimodal = self.config.multimodal

        def write_hf(staging: Path) -> None:
            write_hf_directory(self.model, multimodal.model, self.tokenizer, self.image_processor, staging / HF_DIRECTORY)

        return save_dcp_checkpoint(options.save, state.iteration, self.model, self.optimizer.optimizer,
                                   scheduler=self.scheduler, consumed_samples=state.consumed_train_samples,
                                   save_optim=options.save_optim, save_rng=options.save_rng,
                                   metadata={"config": self.config.record()}, write_also=write_hf)

    def close(self) -> None:
        """Removes the text model's entry hook."""
        self.entry.handle.remove()
