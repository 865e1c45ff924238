"""A tiny vision-language fine-tuning set-up that needs nothing from outside:
``python -m mm_train.tiny_vlm [--out demo/tiny_qwen25vl]`` writes

- ``model/``: a randomly initialised Qwen2.5-VL in Hugging Face format (``config.json``,
  ``model.safetensors``, a byte-level BPE tokenizer trained here with ``tokenizers``, the PIL image
  processor's ``preprocessor_config.json``);
- ``data/``: coloured shapes drawn here (``images/*.png``) and questions about them in MindSpeed-MM's
  mllm format (``train.json``, ``valid.json``: "What colour is the shape?" -> "red" three times in four,
  "What shape is this?" -> "circle" otherwise; the colour is learnt within a hundred steps, the shape
  takes longer), and the same questions about blank images (``train_blank.json``,
  ``valid_blank.json``), to show that a trained model reads the pixels.

``examples/finetune_tiny_qwen25vl.yaml`` (and the ``model``/``data`` JSON pair beside it) train on it.
Sizes are those of :mod:`mm_kernels.bench.hf_models` (``tiny``: 2 text layers of width 64, images of
4 x 4 patches; ``small``: 4 layers of 512, 8 x 8 patches), the vision tower half as wide.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mm_kernels.bench.hf_models import SIZES, mrope_section

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is this?"}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
SYSTEM = "You are a helpful assistant."
PATCH, MERGE = 14, 2


def _corpus() -> list[str]:
    lines = [f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", "<|im_start|>user\n", "<|im_start|>assistant\n"]
    lines += [*QUESTIONS.values(), *COLOURS, *SHAPES]
    return lines * 8


def build_tokenizer(directory: Path):
    """A byte-level BPE tokenizer trained on the demo's text, with Qwen's chat and vision tokens; saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    fast.save_pretrained(directory)
    return fast


def build_model_directory(directory: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Writes the tokenizer, image processor and a random Qwen2.5-VL of ``size`` to ``directory``."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dims = SIZES[size]
    tokenizer = build_tokenizer(directory)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    side = dims.image_side * PATCH
    Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side, patch_size=PATCH,
                             merge_size=MERGE).save_pretrained(directory)
    vocab = 64 * -(-len(tokenizer) // 64)
    special = {"bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
    text = dict(vocab_size=vocab, hidden_size=dims.hidden, num_hidden_layers=dims.layers,
                num_attention_heads=dims.heads, num_key_value_heads=dims.kv_heads, intermediate_size=dims.intermediate,
                max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": mrope_section(dims)}, **special)
    vision_hidden = dims.hidden // 2
    vision = dict(depth=2, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                  out_hidden_size=dims.hidden, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
                  window_size=2 * PATCH * MERGE, fullatt_block_indexes=[1])
    config = transformers.Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], **special)
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    model.generation_config.bos_token_id = None
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(directory)
    return directory


def draw_shape(colour: str, shape: str, side: int, rng: random.Random) -> Image.Image:
    """A ``side`` x ``side`` image: a light background and one large ``shape`` in ``colour``."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (side, side), background)
    extent = rng.randint(side * 5 // 8, side * 7 // 8)
    left, top = rng.randint(0, side - extent), rng.randint(0, side - extent)
    box = (left, top, left + extent - 1, top + extent - 1)
    draw = ImageDraw.Draw(image)
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left + extent // 2, top), (box[2], box[3]), (left, box[3])], fill=fill)
    return image


def _record(image: str, colour: str, shape: str, rng: random.Random) -> dict:
    kind = rng.choices(("colour", "shape"), weights=(3, 1))[0]
    return {"messages": [{"role": "user", "content": f"<image>{QUESTIONS[kind]}"},
                         {"role": "assistant", "content": colour if kind == "colour" else shape}],
            "images": [image]}


def draw_dataset(directory: str | Path, train: int = 256, valid: int = 64, side: int = 56, seed: int = 0) -> Path:
    """Writes the images and the four record files described in the module doc under ``directory``."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (255, 255, 255)).save(directory / "blank.png")
    rng = random.Random(seed)
    splits = {"train": [], "valid": []}
    for index in range(train + valid):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        name = f"images/{index:05d}.png"
        draw_shape(colour, shape, side, rng).save(directory / name)
        splits["train" if index < train else "valid"].append(_record(name, colour, shape, rng))
    for split, records in splits.items():
        (directory / f"{split}.json").write_text(json.dumps(records, indent=1))
        blank = [{**record, "images": ["blank.png"]} for record in records]
        (directory / f"{split}_blank.json").write_text(json.dumps(blank, indent=1))
    return directory


def build(out: str | Path, size: str = "tiny", train: int = 256, valid: int = 64, seed: int = 0) -> Path:
    """The model (``out/model``) and the data (``out/data``) of the demo; returns ``out``."""
    out = Path(out)
    build_model_directory(out / "model", size, seed)
    draw_dataset(out / "data", train, valid, SIZES[size].image_side * PATCH, seed)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m mm_train.tiny_vlm``: builds the demo model and data."""
    parser = argparse.ArgumentParser(prog="python -m mm_train.tiny_vlm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo/tiny_qwen25vl", help="output directory (default demo/tiny_qwen25vl)")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--train", type=int, default=256, help="training records (default 256)")
    parser.add_argument("--valid", type=int, default=64, help="held-out records (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.train < 1 or args.valid < 1:
        parser.error("--train and --valid must be >= 1")
    out = build(args.out, args.size, args.train, args.valid, args.seed)
    print(f"wrote {out / 'model'} and {out / 'data'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
