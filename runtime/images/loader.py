"""The picture the model sees: load, pad to square with the mean colour, resize like CLIP.

The release pads to square and then lets CLIPImageProcessor resize with PIL bicubic;
llama.cpp would letterbox instead (resize, then pad) with its own resampler. Doing both
steps here and handing llama.cpp an image already at the tower's size makes its own
preprocessing a plain copy, so the pixels are the release's exactly.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from huatuo_local.models.prompt import MAX_IMAGES
from huatuo_local.runtime.images.dicom import (
    WINDOW_INFO,
    ImageError,
    frame_index,
    high_bit_depth_to_rgb,
    is_dicom,
    looks_like_dicom,
    read_dicom,
)
from huatuo_local.runtime.images.study import SOURCE_INFO, StudyPicture, expand, is_study, render, window_record
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own default, set explicitly
# The formats README documents; Pillow would also decode TGA, PPM, ICO, PCX, SGI, XBM, IM, QOI ...,
# each one more parser exposed to hostile files for nothing a clinician uses.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
WINDOW_IGNORED = "huatuo_window_ignored"  # set in a picture's .info when a window did not apply to it
FRAME_INFO = "huatuo_frame"  # the frame a multi-frame file's picture shows


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
    # A study (folder, zip, DICOMDIR): which series, which slices, tiled how (images/study.py).
    series: str | None = None
    slices: str | None = None
    montage: tuple[int, int] | None = None


@dataclass(frozen=True)
class ImageData:
    """An image already in memory (an upload, a file read through one descriptor): never written to disk."""

    data: bytes
    name: str  # how messages call it ("the uploaded image", the client's file name, a path)
    dicom: bool = False  # the sender says it is DICOM (a data: URI's MIME type), whatever its name


Source = str | Path | ImageData


@dataclass(frozen=True)
class ImageSpec:
    """An image with its own window and frame (the chat's `/image FILE --window lung`), beside the
    conversation's defaults."""

    source: Source
    options: LoadOptions

    @property
    def name(self) -> str:
        return _label(self.source)


# What the Python API takes as an image: a path (of an image, or of a study: a folder, zip or DICOMDIR), one
# in memory, a PIL image or a numpy array (as the release's users pass), a path with its own window and frame,
# or one picture of a study already chosen (`expand_inputs`).
ImageInput = Source | ImageSpec | Image.Image | np.ndarray | StudyPicture


def expand_inputs(images: list[ImageInput], options: LoadOptions | None = None) -> list[ImageInput]:
    """Each study among `images` replaced by the pictures its series and slices give (images/study.py);
    headers only, no pixel decoded. Everything else is returned as it is."""
    opts = options or LoadOptions()
    out: list[ImageInput] = []
    for image in images:
        source, o = (image.source, image.options) if isinstance(image, ImageSpec) else (image, opts)
        if is_study(source):
            out.extend(expand(source, o.series, o.slices, o.montage, o.window, o.max_pixels))
        else:
            out.append(image)
    return out


def image_name(image: ImageInput) -> str:
    """How messages and transcripts name an image."""
    if isinstance(image, (ImageSpec, StudyPicture)):
        return image.name
    if isinstance(image, Image.Image):
        return "a PIL image"
    if isinstance(image, np.ndarray):
        return "a numpy array"
    return _label(image)


def load_input(image: ImageInput, options: LoadOptions | None = None) -> Image.Image:
    """The RGB picture of anything the Python API takes as an image (see ImageInput)."""
    opts = options or LoadOptions()
    if isinstance(image, StudyPicture):
        return render(image)
    if isinstance(image, ImageSpec):
        return load_rgb(image.source, image.options)
    if isinstance(image, np.ndarray):
        return _from_array(image, opts)
    if isinstance(image, Image.Image):
        check_pixels("a PIL image", *image.size, opts.max_pixels)
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return high_bit_depth_to_rgb(image, opts.window)
        return image.convert("RGB")  # the release's own conversion of what Image.open gave
    if isinstance(image, (str, Path, ImageData)):
        return load_rgb(image, opts)
    raise ImageError(f"an image of type {type(image).__name__}: give a file path, a PIL image or a numpy array")


def image_source(image: ImageInput, picture: Image.Image) -> dict:
    """Where a picture came from, for an answer's record: the file (or study, series and slices), the frame and
    the window. No patient field is ever part of it (studies: images/study.py's source_record)."""
    if SOURCE_INFO in picture.info:
        return dict(picture.info[SOURCE_INFO])
    if isinstance(image, (Image.Image, np.ndarray)):
        return {"file": None, "given": image_name(image)}
    return {"file": image_name(image), "frame": picture.info.get(FRAME_INFO),
            "window": window_record(picture.info.get(WINDOW_INFO))}


def _from_array(array: np.ndarray, opts: LoadOptions) -> Image.Image:
    label = f"a numpy array of shape {tuple(array.shape)} and type {array.dtype}"
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)) or 0 in array.shape:
        raise ImageError(f"{label}: give HxW (grayscale), HxWx3 (RGB) or HxWx4 (RGBA) pixels")
    check_pixels(label, array.shape[1], array.shape[0], opts.max_pixels)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    if array.ndim == 2 and (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        if not np.isfinite(array).all():
            raise ImageError(f"{label}: holds NaN or infinite values")
        # 16-bit or float grayscale (a CT slice in Hounsfield units): the window, else the percentile range.
        return high_bit_depth_to_rgb(Image.fromarray(array.astype(np.float32), "F"), opts.window)
    raise ImageError(f"{label}: colour pixels must be uint8 (0-255); grayscale may be any number type")


def _label(source: Source) -> str:
    return source.name if isinstance(source, ImageData) else str(source)


def _open(source: Source) -> BinaryIO:
    if isinstance(source, ImageData):
        return io.BytesIO(source.data)
    path = Path(source)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():  # studies are expanded before anything is loaded (expand_inputs)
        raise ImageError(f"{path}: is a folder, not an image")
    if not path.is_file():  # a FIFO or device: opening it would block or read forever
        raise ImageError(f"{path}: not a regular file, not an image")
    try:
        return open(path, "rb")
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None


def check_pixels(label: str, width: int, height: int, max_pixels: int) -> None:
    """Refuse, from the size alone, an image whose picture or padded square exceeds the limit.

    The release pads to a square before resizing, so a 20000x1 strip costs a 20000x20000 canvas:
    the square is what memory pays for.
    """
    side = max(width, height)
    if width * height > max_pixels or side * side > max_pixels:
        raise ImageError(f"{label}: image too large ({width}x{height}, padded to a {side}x{side} square = "
                         f"{side * side} pixels, limit {max_pixels}); raise the limit with --max-pixels if you "
                         "trust the file")


def load_rgb(source: Source, options: LoadOptions | None = None) -> Image.Image:
    """The one image loader: Pillow formats, 16-bit grayscale and DICOM → RGB, with clear errors.

    For ordinary 8-bit images this is the release's `Image.open(path).convert('RGB')` (alpha
    dropped, not composited), after applying the EXIF orientation. Sizes are checked from the
    header before any pixel is decoded; a hostile file gets one line, never a traceback.
    """
    opts = options or LoadOptions()
    label = _label(source)
    with _open(source) as f:
        head = f.read(132)
        if not head:
            raise ImageError(f"{label}: empty file (0 bytes)")
        f.seek(0)
        if _dicom(source, head):
            return read_dicom(f, opts.window, opts.frame, opts.max_pixels, label=label)
        return _load_pillow(f, label, opts)


def _dicom(source: Source, head: bytes) -> bool:
    return (is_dicom(_label(source)) or looks_like_dicom(head)
            or (isinstance(source, ImageData) and source.dicom))


def _load_pillow(f: BinaryIO, label: str, opts: LoadOptions) -> Image.Image:
    Image.MAX_IMAGE_PIXELS = max(opts.max_pixels, DEFAULT_MAX_PIXELS)  # ours is checked below, per call
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit; a clinician's file gets one rule.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f, formats=FORMATS) as img:
                check_pixels(label, *img.size, opts.max_pixels)
                # The middle frame by default, as for DICOM: of a stack, the middle is where the anatomy is.
                frames = int(getattr(img, "n_frames", 1) or 1)
                index = frame_index(label, frames, opts.frame)
                img.seek(index)
                img = ImageOps.exif_transpose(img) or img
                check_pixels(label, *img.size, opts.max_pixels)
                if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    rgb = high_bit_depth_to_rgb(img, opts.window)
                    if frames > 1:
                        rgb.info[FRAME_INFO] = index
                    return rgb
                rgb = img.convert("RGB")
                if frames > 1:
                    rgb.info[FRAME_INFO] = index
                if opts.window is not None:  # the caller says so (window_ignored): the picture is as it is
                    rgb.info[WINDOW_IGNORED] = True
                return rgb
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"{label}: image too large ({exc}); raise the limit with --max-pixels if you trust the file") from None
    except EOFError:
        raise ImageError(f"{label}: frame {opts.frame} is past the last frame") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image in a supported format (PNG, JPEG, BMP, GIF, TIFF, WebP, "
                         "DICOM)") from None
    except MemoryError:
        raise ImageError(f"{label}: not enough memory to decode this image") from None
    except Exception as exc:  # Pillow's decoders raise many kinds on hostile data: one line, never a trace
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{label}: unreadable or truncated image ({detail})") from None


def check_images(paths: list[ImageInput], options: LoadOptions) -> list[str]:
    """Read every image once before anything is loaded; returns warnings (a window that did not apply).
    Studies are expanded first (`expand_inputs`); give the expanded list to what follows.

    A typo, a folder or a text file named .png fails here in one line instead of after the model's
    load (seconds and gigabytes) or, in the interactive chat, at the first question.
    """
    return load_checked(paths, options)[1]


def load_checked(paths: list[ImageInput], options: LoadOptions) -> tuple[list[Image.Image], list[str]]:
    """`check_images`, keeping the pictures it read (`chat` hands them to the engine to encode while the model
    loads)."""
    paths = expand_inputs(paths, options)
    if len(paths) > MAX_IMAGES:
        raise ImageError(f"{len(paths)} images: the release takes at most {MAX_IMAGES} per question")
    pictures, notes = [], []
    for p in paths:
        picture = load_input(p, options)
        pictures.append(picture)
        if picture.info.get(WINDOW_IGNORED):
            notes.append(f"warning: {image_name(p)}: --window applies to DICOM and 16-bit grayscale images; this "
                         "8-bit image is shown as it is")
    return pictures, notes


def frame_count(source: Source) -> int:
    """Frames of a DICOM or multi-frame image, from the header only (1 when unknown)."""
    try:
        with _open(source) as f:
            head = f.read(132)
            f.seek(0)
            if _dicom(source, head):
                import pydicom

                ds = pydicom.dcmread(f, stop_before_pixels=True)
                return max(1, int(ds.get("NumberOfFrames", 1) or 1))
            with Image.open(f, formats=FORMATS) as img:
                return max(1, int(getattr(img, "n_frames", 1)))
    except Exception:  # the loader that follows reports the real problem
        return 1


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
