"""MindSpeed-MM's data configuration (``--mm-data data.json``, or the ``data`` section of a
``pretrain_transformers`` YAML), checked and turned into :class:`MllmDataSpec`.

Sections and keys (MindSpeed-MM's names and defaults)::

    dataset_param:
      dataset_type: huggingface
      preprocess_parameters: {model_name_or_path, use_fast_tokenizer, split_special_tokens,
                              image_min_pixels (1024), image_max_pixels (589824), video_*}
      basic_parameters: {template, dataset_dir ("data"), dataset (comma-separated files),
                         train_on_prompt (false), mask_history (false), max_samples (null),
                         val_dataset, val_rate, val_max_samples, enable_thinking, cache_dir, ...}
      attr: {messages, role_tag, content_tag, user_tag, assistant_tag, observation_tag,
             function_tag, system_tag, system, images, videos}
    dataloader_param: {dataloader_mode, shuffle, drop_last, collate_param: {model_name,
                       ignore_pad_token_for_loss}, pin_memory, sampler_type, ...}

Batch size, workers and seed come from --micro-batch-size, --num-workers and --seed, as in
MindSpeed-MM. Keys that only tune MindSpeed-MM's own preprocessing cache are accepted and unused;
an unknown key, or a feature this trainer does not have (videos, packing, streaming), is a
one-line :class:`mm_train.errors.ConfigError` naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mm_train.errors import ConfigError

TEMPLATES = ("qwen2vl", "qwen3_vl_nothink")


@dataclass(frozen=True)
class AttrSpec:
    """Where a record keeps its parts (the ``attr`` mapping); a tag None means that role is not used."""

    messages: str = "conversations"
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str | None = "human"
    assistant_tag: str | None = "gpt"
    observation_tag: str | None = "observation"
    function_tag: str | None = "function_call"
    system_tag: str | None = "system"
    system: str | None = None
    images: str | None = None


@dataclass(frozen=True)
class MllmDataSpec:
    """One multimodal data configuration, checked. Paths are as written (relative to the working
    directory, images relative to ``dataset_dir``)."""

    source: str
    model_name_or_path: str
    template: str
    datasets: tuple[str, ...]
    dataset_dir: str = "data"
    val_datasets: tuple[str, ...] = ()
    val_rate: float = 0.0
    max_samples: int | None = None
    val_max_samples: int | None = None
    train_on_prompt: bool = False
    mask_history: bool = False
    image_min_pixels: int = 32 * 32
    image_max_pixels: int = 768 * 768
    use_fast_tokenizer: bool = True
    split_special_tokens: bool = False
    shuffle: bool = True
    ignore_pad_token_for_loss: bool = True
    attr: AttrSpec = field(default_factory=AttrSpec)


# Keys MindSpeed-MM reads that change nothing here (its preprocessing cache, workers, video and
# audio settings for data without videos, the sampler's name), per section.
_UNUSED = {
    "preprocess_parameters": {"video_max_pixels", "video_min_pixels", "video_fps", "video_maxlen", "image_resolution",
                              "video_resolution", "image_do_pan_and_scan", "crop_to_patches", "use_audio_in_video",
                              "audio_sampling_rate", "trust_remote_code", "fix_mistral_regex"},
    "basic_parameters": {"cache_dir", "preprocessing_batch_size", "preprocessing_num_workers", "overwrite_cache",
                         "tool_format", "enable_thinking", "preprocess_on_fly", "async_preprocess",
                         "async_preprocess_buffer_size", "use_pmcc_data"},
    "dataloader_param": {"dataloader_mode", "drop_last", "sampler_type", "pin_memory", "num_workers", "batch_size",
                         "seed", "collate_param"},
    "collate_param": {"model_name"},
}
# Keys whose value must stay at its default: (section, key) -> (default, what is missing).
_UNSUPPORTED = {
    ("basic_parameters", "streaming"): (False, "streaming data sets are not supported"),
    ("basic_parameters", "packing"): (False, "sequence packing is not supported"),
    ("basic_parameters", "neat_packing"): (False, "sequence packing is not supported"),
    ("attr", "videos"): (None, "videos are not supported (set attr.videos to null)"),
}
_DATALOADER_MODES = ("base", "sampler", "variable")


class _Section:
    """A mapping of the config file with the path of keys that led to it, for messages."""

    def __init__(self, source: str, path: str, raw: object) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: '{path}' must be a mapping, got {type(raw).__name__}")
        self.source, self.path, self.raw = source, path, raw

    def where(self, key: str) -> str:
        return f"{self.source}: key '{self.path}.{key}'"

    def section(self, key: str, required: bool = True) -> _Section:
        if key not in self.raw and not required:
            return _Section(self.source, f"{self.path}.{key}", {})
        if key not in self.raw:
            raise ConfigError(f"{self.where(key)} is missing")
        return _Section(self.source, f"{self.path}.{key}", self.raw[key])

    def get(self, key: str, kind: type | tuple[type, ...], default=None, required: bool = False):
        """The value of ``key`` (``default`` when absent or null), checked to be a ``kind``."""
        if key not in self.raw or self.raw[key] is None:
            if required:
                raise ConfigError(f"{self.where(key)} is missing")
            return default
        value = self.raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{self.where(key)} must be {names}, got {value!r}")
        return value

    def check_keys(self, known: set[str]) -> None:
        name = self.path.rsplit(".", 1)[-1]
        allowed = known | _UNUSED.get(name, set()) | {key for section, key in _UNSUPPORTED if section == name}
        unknown = sorted(str(key) for key in self.raw if key not in allowed)
        if unknown:
            raise ConfigError(f"{self.source}: unknown key(s) {unknown} in '{self.path}'")
        for (section, key), (default, reason) in _UNSUPPORTED.items():
            if section == name and self.raw.get(key) not in (None, default):
                raise ConfigError(f"{self.where(key)}: {reason}")


def _files(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def _count(section: _Section, key: str, minimum: int) -> int | None:
    value = section.get(key, int)
    if value is not None and value < minimum:
        raise ConfigError(f"{section.where(key)} must be >= {minimum}, got {value}")
    return value


def _attr(section: _Section) -> AttrSpec:
    section.check_keys({"messages", "role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag",
                        "function_tag", "system_tag", "system", "images", "formatting"})
    formatting = section.get("formatting", str, "sharegpt")
    if formatting != "sharegpt":
        raise ConfigError(f"{section.where('formatting')}: only 'sharegpt' records are supported, got {formatting!r}")
    defaults = AttrSpec()
    values = {}
    for key in ("messages", "role_tag", "content_tag"):
        values[key] = section.get(key, str, getattr(defaults, key))
    for key in ("user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag", "system", "images"):
        values[key] = section.get(key, str, getattr(defaults, key)) if key in section.raw else getattr(defaults, key)
    for key in ("user_tag", "assistant_tag"):
        if values[key] is None:
            raise ConfigError(f"{section.where(key)} must name the {key[:-4]} role")
    return AttrSpec(**values)


def parse_data_config(raw: object, source: str) -> MllmDataSpec:
    """The checked :class:`MllmDataSpec` of a parsed data configuration (``source`` names it in messages)."""
    top = _Section(source, "data", raw)
    top.check_keys({"dataset_param", "dataloader_param"})
    dataset = top.section("dataset_param")
    dataset.check_keys({"dataset_type", "preprocess_parameters", "basic_parameters", "attr"})
    kind = dataset.get("dataset_type", str, "huggingface")
    if kind != "huggingface":
        raise ConfigError(f"{dataset.where('dataset_type')}: only 'huggingface' (mllm format JSON) is supported, "
                          f"got {kind!r}")
    preprocess = dataset.section("preprocess_parameters")
    preprocess.check_keys({"model_name_or_path", "use_fast_tokenizer", "split_special_tokens", "image_max_pixels",
                           "image_min_pixels"})
    basic = dataset.section("basic_parameters")
    if "cutoff_len" in basic.raw:
        raise ConfigError(f"{basic.where('cutoff_len')}: not used, the sequence length is --seq-length")
    basic.check_keys({"template", "dataset_dir", "dataset", "train_on_prompt", "mask_history", "max_samples",
                      "val_dataset", "val_rate", "val_max_samples"})
    template = basic.get("template", str, required=True)
    if template not in TEMPLATES:
        raise ConfigError(f"{basic.where('template')}: {template!r} is not supported; supported: {', '.join(TEMPLATES)}")
    datasets = _files(basic.get("dataset", str, required=True))
    if not datasets:
        raise ConfigError(f"{basic.where('dataset')} names no file")
    val_rate = basic.get("val_rate", (int, float), 0.0)
    if not 0.0 <= val_rate < 1.0:
        raise ConfigError(f"{basic.where('val_rate')} must be in [0, 1), got {val_rate}")
    min_pixels = _count(preprocess, "image_min_pixels", 0)
    max_pixels = _count(preprocess, "image_max_pixels", 1)
    defaults = MllmDataSpec(source, "", template, datasets)
    min_pixels = defaults.image_min_pixels if min_pixels is None else min_pixels
    max_pixels = defaults.image_max_pixels if max_pixels is None else max_pixels
    if min_pixels > max_pixels:
        raise ConfigError(f"{preprocess.where('image_min_pixels')} {min_pixels} is larger than image_max_pixels "
                          f"{max_pixels}")
    loader = top.section("dataloader_param", required=False)
    loader.check_keys({"shuffle"})
    mode = loader.get("dataloader_mode", str, "sampler")
    if mode not in _DATALOADER_MODES:
        raise ConfigError(f"{loader.where('dataloader_mode')} must be one of {', '.join(_DATALOADER_MODES)}, got {mode!r}")
    collate = loader.section("collate_param", required=False)
    collate.check_keys({"ignore_pad_token_for_loss"})
    return MllmDataSpec(
        source=source,
        model_name_or_path=preprocess.get("model_name_or_path", str, required=True),
        template=template,
        datasets=datasets,
        dataset_dir=basic.get("dataset_dir", str, defaults.dataset_dir),
        val_datasets=_files(basic.get("val_dataset", str)),
        val_rate=float(val_rate),
        max_samples=_count(basic, "max_samples", 1),
        val_max_samples=_count(basic, "val_max_samples", 1),
        train_on_prompt=basic.get("train_on_prompt", bool, False),
        mask_history=basic.get("mask_history", bool, False),
        image_min_pixels=min_pixels,
        image_max_pixels=max_pixels,
        use_fast_tokenizer=preprocess.get("use_fast_tokenizer", bool, True),
        split_special_tokens=preprocess.get("split_special_tokens", bool, False),
        shuffle=loader.get("shuffle", bool, True),
        ignore_pad_token_for_loss=collate.get("ignore_pad_token_for_loss", bool, True),
        attr=_attr(dataset.section("attr", required=False)),
    )
