"""DICOM and high-bit-depth images → the 8-bit RGB picture the model sees.

Grayscale DICOM: modality LUT (rescale slope/intercept), then a window: the user's
(`--window lung` or `--window C,W`), else the file's VOI LUT or Window Center/Width, else
the 0.5-99.5 percentile range; MONOCHROME1 is inverted. Colour DICOM (RGB, YBR, palette)
is converted to RGB. Multi-frame files take `--frame N` (default: the middle frame).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from huatuo_local.models.errors import HuatuoError
from huatuo_local.runtime.system import available_memory
from PIL import Image

# (center, width) in Hounsfield units for CT; the usual radiology presets.
WINDOW_PRESETS = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
}
COLOR_INTERPRETATIONS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420", "PALETTE COLOR")


class ImageError(HuatuoError):
    pass


def parse_window(text: str | None) -> tuple[float, float] | None:
    """'lung' or '-600,1500' → (center, width)."""
    if not text:
        return None
    key = text.strip().lower()
    if key in WINDOW_PRESETS:
        return WINDOW_PRESETS[key]
    try:
        center, width = (float(x) for x in key.split(","))
    except ValueError:
        raise ImageError(
            f"--window {text}: give a preset ({', '.join(WINDOW_PRESETS)}) or CENTER,WIDTH such as 40,400"
        ) from None
    if not (np.isfinite(center) and np.isfinite(width)):
        raise ImageError(f"--window {text}: CENTER and WIDTH must be finite numbers such as 40,400")
    if width <= 0:
        raise ImageError(f"--window {text}: the width must be positive")
    return center, width


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear VOI function (PS3.3 C.11.2.1.2.1) onto 0..255."""
    x = values.astype(np.float64)
    if width <= 1:
        return np.where(x <= center - 0.5, 0, 255).astype(np.uint8)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Window:
    """The grayscale window a picture was made with: centre and width in the file's values (after the
    modality LUT: Hounsfield units for CT), and where it came from; None where it is not linear (a VOI LUT)."""

    center: float | None
    width: float | None
    source: str  # "chosen", "the file's", "the file's VOI LUT", "0.5-99.5 % of the values"


WINDOW_INFO = "huatuo_window"  # the key of a picture's .info holding its Window


def with_window(img: Image.Image, window: Window) -> Image.Image:
    img.info[WINDOW_INFO] = window
    return img


def percentile_window(values: np.ndarray) -> tuple[np.ndarray, Window]:
    """The 0.5-99.5 percentile range onto 0..255, and that range as a window."""
    lo, hi = np.percentile(values.astype(np.float64), [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1
    gray = np.clip(np.round((values - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    return gray, Window(round(float(lo + hi) / 2, 1), round(float(hi - lo), 1), "0.5-99.5 % of the values")


def is_dicom(name: str | Path) -> bool:
    """A DICOM file by its name's extension."""
    return Path(str(name)).suffix.lower() in (".dcm", ".dicom")


def looks_like_dicom(head: bytes) -> bool:
    """A DICOM file by its magic: 'DICM' after the 128-byte preamble."""
    return head[128:132] == b"DICM"


def _first(value) -> float | None:
    if value is None:
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def frame_index(path: str, n_frames: int, frame: int | None) -> int:
    """The frame to show of a multi-frame image: `frame`, else the middle one; one line when out of range."""
    if n_frames > 1:
        index = n_frames // 2 if frame is None else frame
        if not 0 <= index < n_frames:
            raise ImageError(
                f"{path}: --frame {frame} is out of range (the file has {n_frames} frames, 0-{n_frames - 1})")
        return index
    if frame not in (None, 0):
        raise ImageError(f"{path}: --frame {frame}: the file has a single frame")
    return 0


# Decoding one frame and windowing it holds the frame a few times over, as float64 at worst.
_WORKING_BYTES_PER_SAMPLE = 8 * 3


def _check_size(ds, path: str, n_frames: int, samples: int, max_pixels: int) -> None:
    """Refuse from the header alone what would not fit, before any pixel is decoded."""
    rows, cols = _int(ds.get("Rows", 0)), _int(ds.get("Columns", 0))
    bits = _int(ds.get("BitsAllocated", 0))
    if rows <= 0 or cols <= 0 or bits <= 0 or samples not in (1, 3) or n_frames < 1:
        raise ImageError(f"{path}: corrupt DICOM header (Rows {rows}, Columns {cols}, BitsAllocated {bits}, "
                         f"SamplesPerPixel {samples}, NumberOfFrames {n_frames})")
    side = max(rows, cols)
    if rows * cols > max_pixels or side * side > max_pixels:  # padded to a square before resizing
        raise ImageError(f"{path}: image too large ({cols}x{rows} per frame, padded to a {side}x{side} square = "
                         f"{side * side} pixels, limit {max_pixels}); raise the limit with --max-pixels if you "
                         "trust the file")
    need = rows * cols * samples * _WORKING_BYTES_PER_SAMPLE
    if need > available_memory():
        raise ImageError(f"{path}: decoding one {rows}x{cols} frame needs about {need / 2**30:.1f} GiB of memory, "
                         "more than is available; free memory or use a smaller image")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    compressed = bool(syntax is not None and getattr(syntax, "is_compressed", False))
    if not compressed and "PixelData" in ds:
        from pydicom.pixels.utils import get_expected_length

        try:
            expected = get_expected_length(ds, "bytes")  # knows subsampled YBR and 1-bit packing
        except (AttributeError, KeyError, ValueError, TypeError):
            expected = (rows * cols * samples * bits + 7) // 8 * n_frames
        have = len(ds.PixelData or b"")
        if have < expected:
            raise ImageError(f"{path}: truncated pixel data ({have} bytes, but the header promises {n_frames} "
                             f"frame(s), {expected} bytes)")


def read_dicom(source: str | Path | BinaryIO, window: tuple[float, float] | None = None, frame: int | None = None,
               max_pixels: int = 178_956_970, label: str | None = None) -> Image.Image:
    """One frame of a DICOM file (a path or an open binary file) as RGB; `label` names it in messages.

    pydicom parses elements lazily and raises many kinds of errors on damaged or hostile values
    (a bad VR can surface as a TypeError deep inside): every one becomes one line naming the file.
    """
    path = label or str(source)
    try:
        # pydicom warns about irregularities it reads through (implicit VR where explicit was declared,
        # odd padding): the picture is still the file's, and the warnings would only clutter the chat.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _read_dicom(source, path, window, frame, max_pixels)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(f"{path}: not enough memory to decode this DICOM frame") from None
    except Exception as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ImageError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {detail})") from None


def _read_dicom(source, path: str, window, frame, max_pixels) -> Image.Image:
    import logging


    # pydicom logs each decoder that failed, with its traceback; we say why in one line instead.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    ds = _open_dataset(source, path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError(f"{path}: DICOM file without pixel data (a report, plan or structure set?)")
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    if pi not in ("MONOCHROME1", "MONOCHROME2", *COLOR_INTERPRETATIONS):
        raise ImageError(f"{path}: unsupported photometric interpretation {pi or '(missing)'}")
    n_frames = _int(ds.get("NumberOfFrames", 1)) or 1
    samples = _int(ds.get("SamplesPerPixel", 1)) or 1
    index = frame_index(path, n_frames, frame)
    _check_size(ds, path, n_frames, samples, max_pixels)
    # Only the requested frame is decoded (pydicom decodes one frame of a multi-frame file).
    ds.pixel_array_options(index=index if n_frames > 1 else None)
    try:
        pixels = ds.pixel_array
    except (RuntimeError, NotImplementedError) as exc:
        raise ImageError(f"{path}: {_no_decoder(ds, str(exc))}") from None
    except (ValueError, AttributeError, KeyError, TypeError, IndexError, EOFError, OverflowError,
            MemoryError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{path}: corrupt or truncated pixel data ({detail})") from None
    if pixels.ndim == (4 if samples > 1 else 3):  # a decoder that ignored the index
        pixels = pixels[index]
    img = _picture(ds, pi, samples, pixels, window)
    if n_frames > 1:
        img.info["huatuo_frame"] = index  # loader.FRAME_INFO: which frame an answer saw
    return img


def _picture(ds, pi: str, samples: int, pixels, window) -> Image.Image:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])  # the LUT entries' depth, not the pixels'
        return Image.fromarray(_to_uint8(rgb, bits), "RGB")
    if samples == 3 or pi in COLOR_INTERPRETATIONS:
        # pydicom converts YBR to RGB when it decodes (pixel_array's as_rgb default).
        return Image.fromarray(_to_uint8(np.asarray(pixels), int(ds.get("BitsStored", 8) or 8)), "RGB")

    values = apply_modality_lut(pixels, ds)
    if window is not None:
        gray, used = apply_window(values, *window), Window(*window, "chosen")
    elif "VOILUTSequence" in ds:
        voi = apply_voi_lut(values, ds, index=0).astype(np.float64)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        gray = np.clip(np.round(voi / (2**bits - 1) * 255), 0, 255).astype(np.uint8)
        used = Window(None, None, "the file's VOI LUT")
    elif _first(ds.get("WindowCenter")) is not None and _first(ds.get("WindowWidth")):
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        gray, used = apply_window(values, center, width), Window(center, width, "the file's")
    else:
        gray, used = percentile_window(values)
    if pi == "MONOCHROME1":
        gray = 255 - gray
    return with_window(Image.fromarray(gray, "L").convert("RGB"), used)


def _open_dataset(source, path: str):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            return pydicom.dcmread(source)
        except InvalidDicomError:
            # No preamble and 'DICM' marker: a bare dataset, as older systems write. Read it as its bytes say
            # (pydicom detects the VR and byte order) instead of asking for pydicom's force=True.
            if hasattr(source, "seek"):
                source.seek(0)
            ds = pydicom.dcmread(source, force=True)
            if len(ds) == 0:
                raise ImageError(f"{path}: not a DICOM file (no DICOM header and no data elements)") from None
            _bare_dataset_syntax(ds)
            return ds
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ImageError(f"{path}: not a readable DICOM file ({exc})") from None


def _bare_dataset_syntax(ds) -> None:
    """A dataset read without its file meta gets the transfer syntax its bytes were read with (pixel decoding
    needs one)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _no_decoder(ds, text: str) -> str:
    """Why the pixel data cannot be decoded here, and what would decode it, in one line."""
    syntax = ds.file_meta.TransferSyntaxUID.name if "TransferSyntaxUID" in ds.file_meta else "?"
    if "12-bit" in text:  # JPEG Extended at 12 bits: neither GDCM nor Pillow reads it
        return (f"cannot decode {syntax} pixel data at 12 bits: the decoders huatuo-local installs (GDCM, Pillow) "
                "do not read it; `.venv/bin/pip install pylibjpeg pylibjpeg-libjpeg` adds one (GPL-3.0, so it "
                "is not installed by default), or export the study uncompressed")
    if "plugin" in text or "decode" in text.lower():
        return (f"cannot decode {syntax} pixel data with the decoders installed (GDCM, Pillow); export the "
                "study uncompressed, or install pylibjpeg and its plugins into huatuo-local's environment")
    return f"cannot decode {syntax} pixel data ({text.splitlines()[0][:200]})"


def _to_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8 and bits <= 8:
        return arr
    return np.clip(np.round(arr.astype(np.float64) / (2**bits - 1) * 255), 0, 255).astype(np.uint8)


def high_bit_depth_to_rgb(img: Image.Image, window: tuple[float, float] | None) -> Image.Image:
    """16-bit (or 32-bit) grayscale PNG/TIFF → 8-bit, by the window or the percentile range."""
    values = np.asarray(img)
    gray, used = ((apply_window(values, *window), Window(*window, "chosen")) if window is not None
                  else percentile_window(values))
    return with_window(Image.fromarray(gray, "L").convert("RGB"), used)
