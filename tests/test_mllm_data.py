"""The multimodal data path: MindSpeed-MM's data configuration, mllm-format records and their errors,
the qwen2vl / qwen3_vl_nothink templates (labels only on answers, train_on_prompt, mask_history,
truncation), the image size rules, and deterministic, resumable, layout-independent batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm_train.data.mllm import MllmData, load_image_processor, load_tokenizer
from mm_train.data.mllm.images import prepared_size
from mm_train.data.mllm.records import read_records
from mm_train.data.mllm.spec import AttrSpec, parse_data_config
from mm_train.data.mllm.template import IGNORE_INDEX, TEMPLATES, RecordEncoder, budget_split
from mm_train.errors import ConfigError, DataError
from mm_train.features.data import DataConfig, TokenizerConfig
from mm_train.tiny_vlm import build

ATTR = AttrSpec(messages="messages", role_tag="role", content_tag="content", user_tag="user",
                assistant_tag="assistant", observation_tag=None, function_tag=None, system_tag="system",
                images="images")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("demo"), train=12, valid=4)


def _raw(demo: Path, **basic) -> dict:
    return {"dataset_param": {
        "dataset_type": "huggingface",
        "preprocess_parameters": {"model_name_or_path": str(demo / "model"), "image_max_pixels": 3136,
                                  "image_min_pixels": 3136},
        "basic_parameters": {"template": "qwen2vl", "dataset_dir": str(demo / "data"),
                             "dataset": str(demo / "data" / "train.json"), **basic},
        "attr": {"images": "images", "messages": "messages", "role_tag": "role", "content_tag": "content",
                 "user_tag": "user", "assistant_tag": "assistant", "system_tag": "system", "videos": None}},
        "dataloader_param": {"dataloader_mode": "sampler", "shuffle": True,
                             "collate_param": {"model_name": "qwen2vl", "ignore_pad_token_for_loss": True}}}


@pytest.fixture(scope="module")
def tokenizer_and_processor(demo):
    spec = parse_data_config(_raw(demo), "data.json")
    return load_tokenizer(spec), load_image_processor(spec)


def _record(demo: Path, messages: list, images: list[str], tmp_path: Path, name: str = "records.json"):
    path = tmp_path / name
    path.write_text(json.dumps([{"messages": messages, "images": images}]))
    return read_records((str(path),), ATTR, str(demo / "data"), None)


def _encoder(tokenizer, template="qwen2vl", cutoff=256, train_on_prompt=False, mask_history=False):
    return RecordEncoder(tokenizer, TEMPLATES[template], cutoff, train_on_prompt, mask_history)


def test_labels_only_on_the_answer_with_the_default_system_prompt(demo, tokenizer_and_processor, tmp_path):
    tokenizer, _ = tokenizer_and_processor
    records = _record(demo, [{"role": "user", "content": "<image>What colour is the shape?"},
                             {"role": "assistant", "content": "red"}], ["images/00000.png"], tmp_path).records
    ids, labels = _encoder(tokenizer).encode(records[0], [4])
    text = tokenizer.decode(ids)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                    + "<|image_pad|>" * 4 + "<|vision_end|>What colour is the shape?<|im_end|>\n"
                    "<|im_start|>assistant\nred<|im_end|>\n")
    answer = tokenizer.encode("red<|im_end|>\n", add_special_tokens=False)
    assert labels == [IGNORE_INDEX] * (len(ids) - len(answer)) + answer
    nothink, _ = _encoder(tokenizer, "qwen3_vl_nothink").encode(records[0], [4])
    assert not tokenizer.decode(nothink).startswith("<|im_start|>system")


def test_train_on_prompt_and_mask_history(demo, tokenizer_and_processor, tmp_path):
    tokenizer, _ = tokenizer_and_processor
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>What shape is this?"},
                {"role": "assistant", "content": "circle"}, {"role": "user", "content": "What colour is the shape?"},
                {"role": "assistant", "content": "red"}]
    record = _record(demo, messages, ["images/00000.png"], tmp_path).records[0]
    assert record.system == "Be brief."
    ids, labels = _encoder(tokenizer).encode(record, [4])
    first = tokenizer.encode("circle<|im_end|>\n", add_special_tokens=False)
    second = tokenizer.encode("red<|im_end|>\n", add_special_tokens=False)
    assert [t for t in labels if t != IGNORE_INDEX] == first + second
    assert _encoder(tokenizer, train_on_prompt=True).encode(record, [4]) == (ids, ids)
    masked_ids, masked = _encoder(tokenizer, mask_history=True).encode(record, [4])
    assert masked_ids == ids and [t for t in masked if t != IGNORE_INDEX] == second


def test_budget_split_follows_the_answer_first_rule():
    assert budget_split(10, 3, 8) == (5, 3)     # a short answer keeps its room
    assert budget_split(3, 10, 8) == (3, 5)     # else a short prompt keeps its room
    assert budget_split(10, 10, 8) == (4, 4)    # else both shrink in proportion
    assert budget_split(2, 2, 100) == (2, 2)


def test_truncation_drops_late_turns_and_refuses_to_cut_an_image(demo, tokenizer_and_processor, tmp_path):
    tokenizer, _ = tokenizer_and_processor
    messages = [{"role": "user", "content": "What colour is the shape?"}, {"role": "assistant", "content": "red"},
                {"role": "user", "content": "What shape is this?"}, {"role": "assistant", "content": "circle"}]
    record = _record(demo, messages, [], tmp_path).records[0]
    full, _ = _encoder(tokenizer).encode(record, [])
    cut, labels = _encoder(tokenizer, cutoff=len(full) - 3).encode(record, [])
    assert len(cut) <= len(full) - 3 and len(cut) == len(labels)
    image = _record(demo, [{"role": "user", "content": "<image>" + "What shape is this? " * 6},
                           {"role": "assistant", "content": "circle"}], ["images/00000.png"], tmp_path).records[0]
    with pytest.raises(DataError, match=r"record 0 of .*records.json: \d+ tokens with its images do not fit in "
                                        r"--seq-length 20 without cutting an image"):
        _encoder(tokenizer, cutoff=20).encode(image, [16])


@pytest.mark.parametrize("case, message", [
    ("missing", r"record 0 of .*bad.json: image .*images/nowhere.png does not exist"),
    ("unreadable", r"record 0 of .*bad.json: image .*not_an_image.png cannot be read"),
    ("count", r"record 0 of .*bad.json: 2 <image> placeholder\(s\) but 1 image\(s\) \(.*00000.png\)"),
    ("not json", r"bad.json: not JSON"),
], ids=["missing", "unreadable", "count", "not-json"])
def test_bad_records_are_one_line_naming_record_and_file(demo, tmp_path, case, message):
    (tmp_path / "not_an_image.png").write_text("plain text")
    path = tmp_path / "bad.json"
    images = {"missing": ["images/nowhere.png"], "unreadable": [str(tmp_path / "not_an_image.png")]}.get(
        case, ["images/00000.png"])
    content = "<image><image>Two?" if case == "count" else "<image>What?"
    path.write_text("[{" if case == "not json" else json.dumps(
        [{"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "red"}],
          "images": images}]))
    with pytest.raises(DataError, match=message) as error:
        read_records((str(path),), ATTR, str(demo / "data"), None)
    assert "\n" not in str(error.value)


def test_records_with_roles_out_of_order_are_skipped_and_json_lines_read(demo, tmp_path):
    path = tmp_path / "records.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "red"}], "images": []}
    bad = {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "red"}], "images": []}
    path.write_text("\n".join(json.dumps(r) for r in (good, bad, good)) + "\n")
    result = read_records((str(path),), ATTR, str(demo / "data"), None)
    assert (len(result.records), result.skipped) == (2, 1) and result.first_skipped.startswith("record 1 of")
    assert len(read_records((str(path),), ATTR, str(demo / "data"), 1).records) == 1


def test_image_size_rules():
    assert prepared_size(1000, 1000, 0, 250_000, 28) == (500, 500)       # scaled down to the pixel limit
    assert prepared_size(10, 10, 3136, 10**6, 28) == (56, 56)            # scaled up to the minimum
    assert prepared_size(20, 100, 0, 10**6, 28) == (28, 100)             # short side raised to one merged patch
    width, height = prepared_size(10_000, 30, 0, 10**9, 28)               # aspect 333 clamped to 180
    assert (width, height) == (5400, 30)


@pytest.mark.parametrize("change, message", [
    ({"cutoff_len": 10}, "key 'data.dataset_param.basic_parameters.cutoff_len': not used, the sequence length is "
                         "--seq-length"),
    ({"template": "llava"}, "'llava' is not supported; supported: qwen2vl, qwen3_vl_nothink"),
    ({"packing": True}, "sequence packing is not supported"),
    ({"val_rate": 1.5}, "val_rate' must be in [0, 1)"),
    ({"shuffle_seed": 1}, "unknown key(s) ['shuffle_seed'] in 'data.dataset_param.basic_parameters'"),
], ids=["cutoff_len", "template", "packing", "val_rate", "unknown"])
def test_data_config_errors_name_file_and_key(demo, change, message):
    with pytest.raises(ConfigError) as error:
        parse_data_config(_raw(demo, **change), "data.json")
    assert str(error.value).startswith("data.json: ") and message in str(error.value)


def test_videos_are_refused(demo):
    raw = _raw(demo)
    raw["dataset_param"]["attr"]["videos"] = "videos"
    with pytest.raises(ConfigError, match="videos are not supported"):
        parse_data_config(raw, "data.json")


def _data_config(**values) -> DataConfig:
    base = dict(data_paths=(), data_weights=None, split=(1.0, 0.0, 0.0), tokenizer=TokenizerConfig(), num_workers=0, variable_seq_lengths=True, mock_data=False,
                seq_length=64, seed=7, micro_batch_size=2, global_batch_size=4, eval_interval=2, eval_iters=1,
                pad_multiple=2)
    return DataConfig(**{**base, **values})


def _batches(data: MllmData, config: DataConfig, consumed: int, rank: int, size: int, count: int) -> list[dict]:
    train, _ = data.iterators(config, consumed, rank, size)
    return [next(train) for _ in range(count)]


def test_batches_are_shifted_padded_and_the_same_for_any_layout(demo, tokenizer_and_processor):
    tokenizer, processor = tokenizer_and_processor
    spec = parse_data_config(_raw(demo, val_rate=0.25), "data.json")
    data = MllmData(spec, tokenizer, processor, seq_length=64, seed=7)
    assert (len(data.train.records), len(data.valid.records)) == (9, 3)
    config = _data_config()
    one = _batches(data, config, 0, 0, 1, 4)
    for batch in one:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        assert ids.shape == labels.shape == mask.shape and ids.shape[1] % 2 == 0
        inside = (labels[:, :-1] != IGNORE_INDEX) & (mask[:, 1:] == 1)   # the target of t is the input at t + 1
        assert inside.any() and torch.equal(labels[:, :-1][inside], ids[:, 1:][inside])
        assert not ((labels != IGNORE_INDEX) & (mask == 0)).any()
        assert batch["pixel_values"].shape == (batch["image_grid_thw"].prod(-1).sum(), 1176)
        assert int((ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == \
            int(batch["image_grid_thw"].prod(-1).sum()) // 4
    assert one[0]["input_ids"].shape == one[1]["input_ids"].shape   # padded to the longest of the global batch
    ranks = [_batches(data, config, 0, rank, 2, 2) for rank in range(2)]
    for step in range(2):
        for key in ("input_ids", "labels", "pixel_values"):
            assert torch.equal(one[2 * step][key], ranks[0][step][key])
            assert torch.equal(one[2 * step + 1][key], ranks[1][step][key])
    resumed = _batches(data, config, 4, 0, 1, 2)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(resumed, one[2:], strict=True))
