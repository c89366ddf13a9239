"""Image loading (any PIL mode -> RGB, clear errors for unreadable files) and the BLIP image processors.

Processors accept a PIL image, a path (``str`` / ``os.PathLike``) or an ``uint8`` numpy array (HxW,
HxWx3, HxWx4) and return a float32 tensor [3, image_size, image_size], normalised with the CLIP
statistics unless ``mean``/``std`` are given.
"""
from __future__ import annotations

import os
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

import registry
from processors.base import BaseProcessor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageLoadError(OSError):
    """An image file is missing, truncated, or not an image. ``path`` names the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot load image '{path}': {reason}")
        self.path = path


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB.

    Transparent pixels (RGBA, LA, P with a transparency entry, ...) are composited over ``background``
    (white) rather than revealing whatever colour hides under alpha 0. 16-bit and 32-bit integer
    grey images are scaled from 0..65535 to 0..255 (a plain PIL convert would clip them to white);
    float images in [0, 1] are scaled to 0..255.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        if mode in _SIXTEEN_BIT_MODES or (mode == "I" and values.size and values.max() > 255):
            values = values / 257.0  # 65535 -> 255
        elif mode == "F" and values.size and values.max() <= 1.0:
            values = values * 255.0
        grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"cannot convert a PIL image of mode '{mode}' to RGB: {err}") from err


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file fully and return it as RGB; any failure raises ``ImageLoadError`` naming the file.

    The pixels are decoded here (not lazily), so a truncated file fails at load time, in the data
    loader, where the dataset's skip/error policy can handle it.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except FileNotFoundError as err:
        raise ImageLoadError(path, "no such file") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(path, "not an image file PIL can identify") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(path, f"corrupt or truncated image ({err})") from err


def as_rgb_image(item: Any) -> Image.Image:
    """Accept a PIL image, a path or a uint8 numpy array and return an RGB PIL image."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, (str, os.PathLike)):
        return load_image(item)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (3, 4)):
            raise TypeError(
                f"numpy images must be uint8 HxW, HxWx3 or HxWx4; got dtype {item.dtype}, shape {item.shape}"
            )
        return to_rgb(Image.fromarray(item))
    raise TypeError(f"expected a PIL image, a path or a uint8 numpy array, got {type(item).__name__}")


def _float_triple(values: Sequence[float], name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {values}")
    return values  # type: ignore[return-value]


class BlipImageBaseProcessor(BaseProcessor):
    """Shared part of the image processors: input conversion, ToImage/ToDtype and Normalize."""

    CONFIG_KEYS: ClassVar[tuple[str, ...]] = ("image_size", "mean", "std")

    def __init__(self, image_size: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        self.image_size = image_size
        self.mean = _float_triple(CLIP_MEAN if mean is None else mean, "mean")
        self.std = _float_triple(CLIP_STD if std is None else std, "std")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        geometric = self.geometric_transforms()
        self.geometric = v2.Compose(geometric)
        # the reference pipeline (and what repr shows); __call__ computes the same without the per-call dispatch
        self.transform = v2.Compose([*geometric, *self._to_normalized_tensor()])
        self._tensor_tail = v2.Compose(self._to_normalized_tensor())  # for a geometric transform returning a tensor
        self._mean_chw = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std_chw = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        self._video_transform: v2.Compose | None = None  # built on first use of process_frames

    def geometric_transforms(self, for_video: bool = False) -> list[Any]:
        """Transforms applied before tensor conversion (resize, crop, flip, augment).

        Images go through them as PIL images; clips as one uint8 ``tv_tensors.Video`` [T, 3, H, W],
        so that every frame of a clip gets the same random crop/flip/augmentation.
        """
        raise NotImplementedError

    def _to_normalized_tensor(self) -> list[Any]:
        return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def __call__(self, image: Any) -> torch.Tensor:
        """image (PIL / path / uint8 array) -> float32 tensor [3, image_size, image_size].

        Geometric transforms run on the PIL image; the tensor conversion and normalisation are the
        arithmetic of v2.ToImage / ToDtype(scale=True) / Normalize (x / 255 - mean) / std, written out:
        on small images the three transforms' dispatch costs more than the arithmetic.
        """
        image = self.geometric(as_rgb_image(image))
        if not isinstance(image, Image.Image):  # a transform that already returned a tensor
            return self._tensor_tail(image).as_subclass(torch.Tensor)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # [3, H, W]
        return pixels.to(torch.float32).mul_(1.0 / 255).sub_(self._mean_chw).div_(self._std_chw)

    def process_frames(self, frames: Any) -> torch.Tensor:
        """Video frames -> float32 tensor [3, T, image_size, image_size], one random draw for the clip.

        ``frames``: a uint8 array/tensor [T, H, W, 3] (what decord's ``get_batch(...).asnumpy()`` gives)
        or a sequence of frames (PIL images, paths or uint8 arrays of one size).
        """
        if isinstance(frames, torch.Tensor):
            frames = frames.numpy()
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            if frames.dtype != np.uint8 or frames.shape[-1] != 3:
                raise TypeError(f"video arrays must be uint8 [T, H, W, 3]; got dtype {frames.dtype}, shape {frames.shape}")
            clip = frames
        else:
            images = [np.asarray(as_rgb_image(frame)) for frame in frames]
            if not images:
                raise ValueError("process_frames needs at least one frame")
            if len({im.shape for im in images}) != 1:
                raise ValueError(f"all frames of a clip must have one size, got {sorted({im.shape for im in images})}")
            clip = np.stack(images)
        if self._video_transform is None:
            self._video_transform = v2.Compose([*self.geometric_transforms(for_video=True), *self._to_normalized_tensor()])
        video = tv_tensors.Video(torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2))  # [T, 3, H, W]
        return self._video_transform(video).as_subclass(torch.Tensor).permute(1, 0, 2, 3).contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, transform={self.transform})"


@registry.processors.register("blip_image_eval")
class BlipImageEvalProcessor(BlipImageBaseProcessor):
    """Bicubic resize to (image_size, image_size) (aspect ratio not kept, no crop), tensor, normalise."""

    def __init__(self, image_size: int = 384, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__(image_size, mean, std)

    def geometric_transforms(self, for_video: bool = False) -> list[Any]:
        size = (self.image_size, self.image_size)
        return [v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True)]


@registry.processors.register("blip2_image_train")
class Blip2ImageTrainProcessor(BlipImageBaseProcessor):
    """RandomResizedCrop(scale=(min_scale, max_scale), bicubic) + horizontal flip, tensor, normalise."""

    CONFIG_KEYS: ClassVar[tuple[str, ...]] = ("image_size", "mean", "std", "min_scale", "max_scale")

    def __init__(
        self,
        image_size: int = 364,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        min_scale: float = 0.5,
        max_scale: float = 1.0,
    ) -> None:
        if not 0 < min_scale <= max_scale <= 1:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got min_scale={min_scale}, max_scale={max_scale}")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        super().__init__(image_size, mean, std)

    def geometric_transforms(self, for_video: bool = False) -> list[Any]:
        return [
            v2.RandomResizedCrop(
                self.image_size,
                scale=(self.min_scale, self.max_scale),
                interpolation=InterpolationMode.BICUBIC,
                antialias=True,
            ),
            v2.RandomHorizontalFlip(),
        ]


@registry.processors.register("blip_image_train")
class BlipImageTrainProcessor(Blip2ImageTrainProcessor):
    """``blip2_image_train`` plus torchvision RandAugment (optional; on by default as in BLIP).

    ``randaug_magnitude`` uses BLIP's 0..10 scale (default 5 = half the maximum strength), mapped onto
    torchvision's RandAugment with 11 magnitude bins.
    """

    CONFIG_KEYS: ClassVar[tuple[str, ...]] = Blip2ImageTrainProcessor.CONFIG_KEYS + (
        "randaug",
        "randaug_num_ops",
        "randaug_magnitude",
    )

    def __init__(
        self,
        image_size: int = 384,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        min_scale: float = 0.5,
        max_scale: float = 1.0,
        randaug: bool = True,
        randaug_num_ops: int = 2,
        randaug_magnitude: int = 5,
    ) -> None:
        if not 0 <= randaug_magnitude <= 10:
            raise ValueError(f"randaug_magnitude is on a 0..10 scale, got {randaug_magnitude}")
        self.randaug = bool(randaug)
        self.randaug_num_ops = int(randaug_num_ops)
        self.randaug_magnitude = int(randaug_magnitude)
        super().__init__(image_size, mean, std, min_scale, max_scale)

    def geometric_transforms(self, for_video: bool = False) -> list[Any]:
        transforms = super().geometric_transforms(for_video)
        if self.randaug:
            transforms.append(
                v2.RandAugment(
                    num_ops=self.randaug_num_ops,
                    magnitude=self.randaug_magnitude,
                    num_magnitude_bins=11,
                    # torchvision's tensor kernels (used for clips) support only nearest/bilinear here
                    interpolation=InterpolationMode.BILINEAR if for_video else InterpolationMode.BICUBIC,
                )
            )
        return transforms
