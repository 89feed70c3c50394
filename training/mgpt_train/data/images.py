"""Images -> patches in the Hugging Face Qwen2-VL / Qwen3-VL processor layout.

Steps (each matches ``Qwen2VLImageProcessorPil`` with the same settings, bit for bit):
1. RGB uint8; resize with PIL bicubic to ``smart_resize`` dimensions (multiples of ``patch_size * merge_size``,
   pixel count inside ``[min_pixels, max_pixels]``, aspect ratio kept).
2. rescale by 1/255 (in float64, then float32) and normalise ``(x - mean) / std`` per channel in float32.
3. cut into ``patch_size`` squares ordered so every ``merge_size x merge_size`` block of patches is contiguous
   (row-major over blocks, row-major inside a block), each patch repeated ``temporal_patch_size`` times in time
   and flattened channel-major to ``3 * temporal_patch_size * patch_size * patch_size`` values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ImageInput = Image.Image | np.ndarray | str | Path


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Defaults are Qwen3-VL's released ``preprocessor_config.json``; :meth:`tiny` suits tiny CPU models."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImageProcessorConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"ImageProcessorConfig: min_pixels ({self.min_pixels}) must be <= max_pixels ({self.max_pixels})"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("ImageProcessorConfig: image_mean and image_std need 3 values, std > 0")

    @classmethod
    def tiny(cls) -> ImageProcessorConfig:
        """Qwen3-VL's patch layout with a pixel budget for 32-128 px images (one merge block at least)."""
        return cls(min_pixels=32 * 32, max_pixels=128 * 128)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    def grid_for_size(self, height: int, width: int) -> tuple[int, int, int]:
        """``(t, h, w)`` in patches of an image of ``height x width`` pixels, without processing it."""
        resized_h, resized_w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return 1, resized_h // self.patch_size, resized_w // self.patch_size

    def merged_tokens(self, grid_thw: tuple[int, int, int]) -> int:
        """LM placeholder tokens of an image: one per merge block."""
        t, h, w = grid_thw
        return t * h * w // (self.merge_size**2)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's resize rule: nearest multiples of ``factor``, then scaled into the pixel budget keeping aspect."""
    if min(height, width) < 1:
        raise ValueError(f"smart_resize: image must be at least 1x1, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"smart_resize: aspect ratio must be <= 200, got {height}x{width}")
    resized_h = round(height / factor) * factor
    resized_w = round(width / factor) * factor
    if resized_h * resized_w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        resized_h = max(factor, math.floor(height / shrink / factor) * factor)
        resized_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif resized_h * resized_w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        resized_h = math.ceil(height * grow / factor) * factor
        resized_w = math.ceil(width * grow / factor) * factor
    return resized_h, resized_w


def load_rgb(image: ImageInput) -> Image.Image:
    """A PIL RGB image from a PIL image, a uint8 array ``[H, W]``/``[H, W, 3]``/``[H, W, 4]``, or a file path."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(
                "load_rgb: an array image must be uint8 [H, W], [H, W, 3] or [H, W, 4], "
                f"got {image.dtype} {list(image.shape)}"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"load_rgb: expected a PIL image, a uint8 numpy array or a path, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def image_size(image: ImageInput) -> tuple[int, int]:
    """``(height, width)`` without decoding pixels where the input is a file."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            width, height = opened.size
        return height, width
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    if isinstance(image, Image.Image):
        width, height = image.size
        return height, width
    raise TypeError(f"image_size: expected a PIL image, a numpy array or a path, got {type(image).__name__}")


def patchify(image: ImageInput, config: ImageProcessorConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One image -> ``(pixel_values float32 [t*h*w, patch_dim], (t, h, w))`` in the HF layout (module docstring)."""
    rgb = load_rgb(image)
    height, width = rgb.height, rgb.width
    resized_h, resized_w = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
    if (resized_h, resized_w) != (height, width):
        rgb = rgb.resize((resized_w, resized_h), resample=Image.Resampling.BICUBIC)
    pixels = (np.asarray(rgb, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    pixels = (pixels - mean) / std  # [H, W, C]
    p, m, tp = config.patch_size, config.merge_size, config.temporal_patch_size
    grid_h, grid_w = resized_h // p, resized_w // p
    blocks = torch.from_numpy(np.ascontiguousarray(pixels)).reshape(grid_h // m, m, p, grid_w // m, m, p, 3)
    # -> [block_row, block_col, row_in_block, col_in_block, channel, y, x]: merge blocks contiguous
    blocks = blocks.permute(0, 3, 1, 4, 6, 2, 5)
    patches = blocks.unsqueeze(5).expand(-1, -1, -1, -1, -1, tp, -1, -1)
    pixel_values = patches.reshape(grid_h * grid_w, config.patch_dim).contiguous()
    return pixel_values, (1, grid_h, grid_w)
