"""Images as MindSpeed-MM prepares them for Qwen-VL models, then through the model's image processor.

Before the Hugging Face image processor (whose own ``min_pixels``/``max_pixels`` resize still
applies), an image is scaled to at most ``image_max_pixels`` and at least ``image_min_pixels``
pixels, keeping its aspect ratio; a side shorter than one merged patch (patch size x merge size,
28 pixels for Qwen2-VL and Qwen2.5-VL) is enlarged to it, and an aspect ratio above 200 is
clamped to 180. The size of the result is computable from the original size alone
(:func:`prepared_size`), so token counts are known before any image is decoded.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from mm_train.errors import DataError

_MAX_ASPECT, _CLAMPED_ASPECT = 200, 180


def _scaled(width: int, height: int, pixels: int) -> tuple[int, int]:
    factor = math.sqrt(pixels / (width * height))
    return max(1, int(width * factor)), max(1, int(height * factor))


def prepared_size(width: int, height: int, min_pixels: int, max_pixels: int, min_side: int) -> tuple[int, int]:
    """(width, height) of an image of that size after the pixel limits and the side and aspect rules."""
    if width * height > max_pixels:
        width, height = _scaled(width, height, max_pixels)
    if width * height < min_pixels:
        width, height = _scaled(width, height, min_pixels)
    width, height = max(width, min_side), max(height, min_side)
    if width / height > _MAX_ASPECT:
        width = height * _CLAMPED_ASPECT
    if height / width > _MAX_ASPECT:
        height = width * _CLAMPED_ASPECT
    return width, height


class ImagePreparer:
    """Loads images and turns them into ``pixel_values`` [patches, C * T * P * P] and ``image_grid_thw``
    [1, 3] with ``processor`` (a Qwen2-VL family image processor), after the size rules above."""

    def __init__(self, processor, min_pixels: int, max_pixels: int) -> None:
        self.processor = processor
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.merge = processor.merge_size
        self.min_side = processor.patch_size * processor.merge_size

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The prepared (width, height) of an image of this size."""
        return prepared_size(width, height, self.min_pixels, self.max_pixels, self.min_side)

    def tokens(self, width: int, height: int) -> int:
        """Placeholder tokens of an image of this (original) size: its patches / merge^2."""
        prepared_width, prepared_height = self.size(width, height)
        return self.processor.get_number_of_image_patches(prepared_height, prepared_width, {}) // self.merge ** 2

    def load(self, path: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values float32 [patches, dim], image_grid_thw int64 [1, 3]) of the image at ``path``."""
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except OSError as error:
            raise DataError(f"{where}: image {path} cannot be read ({type(error).__name__})") from None
        size = self.size(*image.size)
        if size != image.size:
            image = image.resize(size)
        out = self.processor(images=[image], return_tensors="pt")
        return out["pixel_values"].float(), out["image_grid_thw"].long()
