"""The picture the model sees: load, pad to square with the mean colour, resize like CLIP.

The release pads to square and then lets CLIPImageProcessor resize with PIL bicubic;
llama.cpp would letterbox instead (resize, then pad) with its own resampler. Doing both
steps here and handing llama.cpp an image already at the tower's size makes its own
preprocessing a plain copy, so the pixels are the release's exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .dicom import ImageError, high_bit_depth_to_rgb, is_dicom, read_dicom

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own default, set explicitly


@dataclass(frozen=True)
class VisionInput:
    image_size: int
    image_mean: tuple[float, float, float]

    @property
    def pad_color(self) -> tuple[int, int, int]:
        return tuple(int(x * 255) for x in self.image_mean)  # type: ignore[return-value]


@dataclass(frozen=True)
class LoadOptions:
    window: tuple[float, float] | None = None  # (center, width), see dicom.parse_window
    frame: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS


def load_rgb(path: str | Path, options: LoadOptions | None = None) -> Image.Image:
    """The one image loader: Pillow formats, 16-bit grayscale and DICOM → RGB, with clear errors.

    For ordinary 8-bit images this is the release's `Image.open(path).convert('RGB')` (alpha
    dropped, not composited), after applying the EXIF orientation.
    """
    opts = options or LoadOptions()
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    if is_dicom(path):
        return read_dicom(path, opts.window, opts.frame, opts.max_pixels)
    Image.MAX_IMAGE_PIXELS = opts.max_pixels
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x the limit; a clinician's file gets one rule.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if opts.frame is not None:
                    img.seek(opts.frame)
                else:
                    img.seek(0)
                img = ImageOps.exif_transpose(img) or img
                if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    return high_bit_depth_to_rgb(img, opts.window)
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"{path}: image too large ({exc}); raise the limit with --max-pixels if you trust the file") from exc
    except EOFError as exc:
        raise ImageError(f"{path}: --frame {opts.frame} is past the last frame") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{path}: not an image Pillow can read (PNG, JPEG, BMP, GIF, TIFF, WebP)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{path}: unreadable or truncated image ({exc})") from exc


def expand_to_square(img: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """The release's pad: a square canvas of the mean colour, the image centred on the short axis."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), color)
    canvas.paste(img, ((side - w) // 2, 0) if w < h else (0, (side - h) // 2))
    return canvas


def clip_resize(img: Image.Image, size: int) -> Image.Image:
    """CLIPImageProcessor's resize (shortest side, PIL bicubic) and centre crop."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if (new_w, new_h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


def prepare(img: Image.Image, vision: VisionInput) -> Image.Image:
    """Pad to square, then resize and crop to the tower's input size: what llama.cpp receives."""
    return clip_resize(expand_to_square(img.convert("RGB"), vision.pad_color), vision.image_size)
