"""A DICOM study (a folder, a zip or a DICOMDIR) → the slices the model sees.

A CT or MR study is tens to hundreds of files in one or more series; the model takes at most six
pictures. Reading one goes in three steps, each bounded before the next costs anything:

1. headers only (`read_study`): every file's series, position and size, no pixel decoded, no patient
   field read (only the tags in `_HEADER_TAGS` are parsed);
2. a choice (`choose_series`, `choose_slices`): the series (`--series N|UID`; several series and no
   choice is one line listing them), then the slices (`--slices auto|auto:N|A:B:S|I,J,K`), ordered along
   the slice normal (ImagePositionPatient projected on ImageOrientationPatient's normal), else by
   InstanceNumber, else by file name;
3. the chosen slices' pixels (`render`), one at a time, each through the single-file DICOM reader
   (dicom.py) with one window for the whole series, alone or tiled into a labelled montage.

Nothing is extracted or written: a zip's members are read in memory, within size limits.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from huatuo_local.models.prompt import MAX_IMAGES
from huatuo_local.runtime.images.dicom import WINDOW_INFO, ImageError, Window, read_dicom
from PIL import Image, ImageDraw, ImageFont

MAX_STUDY_FILES = 5000  # files looked at in one study (a whole-body CT is ~2000 slices)
MAX_SLICE_BYTES = 512 * 1024 * 1024  # one file of a zip, uncompressed (an enhanced multi-frame MR fits)
MAX_CHOSEN_PIXELS = 256 * 1024 * 1024  # all chosen slices together, from their headers, before decoding
MAX_MONTAGE_SIDE = 6  # rows or columns of a montage
MONTAGE_CELL = 512  # a montage cell's side at most, in pixels
SOURCE_INFO = "huatuo_source"  # the key of a picture's .info holding where it came from (record.py)

# The only tags read from a header: what grouping, ordering and sizing need, and no patient field.
_HEADER_TAGS = ["SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "ImagePositionPatient",
                "ImageOrientationPatient", "InstanceNumber", "Rows", "Columns", "NumberOfFrames", "SOPClassUID"]
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class SliceRef:
    """One slice: a file in a folder or a zip, and its frame in a multi-frame file."""

    name: str  # the file's path relative to the study (a zip member's name)
    frame: int | None
    position: float | None  # millimetres along the slice normal
    instance: int | None
    pixels: int  # Rows x Columns


@dataclass(frozen=True)
class Series:
    uid: str
    number: int | None
    modality: str
    description: str  # shown when choosing, never written to a record
    slices: tuple[SliceRef, ...]
    ordered_by: str  # "position", "instance number" or "file name"

    @property
    def uid_digest(self) -> str:
        """What a record keeps of the series' UID: its SHA-256, 16 hex digits. A de-identified export
        replaces UIDs for a reason; the digest still tells two series apart and matches the original."""
        return hashlib.sha256(self.uid.encode()).hexdigest()[:16]

    def label(self) -> str:
        number = f"#{self.number}" if self.number is not None else "(no number)"
        desc = f" '{self.description}'" if self.description else ""
        return f"{number} {self.modality or '?'}{desc} {len(self.slices)} slice(s)"


@dataclass(frozen=True)
class Study:
    source: str  # as the user named it
    kind: str  # "folder", "zip" or "DICOMDIR"
    series: tuple[Series, ...]
    skipped: int = 0  # files that are not DICOM images (reports, DICOMDIR, text) or not readable
    # A zip held in memory (an upload), or a folder's files read into memory (the server's file:// folders).
    data: bytes | dict[str, bytes] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class StudyPicture:
    """One picture made of a study: one slice, or several tiled into a montage. What `expand` gives for a
    study, an image like any other for the loader (images/loader.py)."""

    study: Study = field(repr=False)
    series: Series = field(repr=False)
    indices: tuple[int, ...]
    montage: tuple[int, int] | None
    window: tuple[float, float] | None
    max_pixels: int

    @property
    def name(self) -> str:
        chosen = ",".join(str(i) for i in self.indices)
        tiles = f" montage {self.montage[0]}x{self.montage[1]}" if self.montage else ""
        return f"{self.study.source} series {self.series.number if self.series.number is not None else '?'} " \
               f"slice(s) {chosen}{tiles}"


def is_zip(data: bytes) -> bool:
    """A zip archive by its magic (a local file header, or the end record of an empty one)."""
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def is_study(source: object) -> bool:
    """A folder, a .zip or a DICOMDIR: something `read_study` opens (any other path is one image)."""
    if not isinstance(source, (str, Path)):
        return False
    path = Path(source)
    return path.is_dir() or (path.is_file() and (path.suffix.lower() == ".zip" or path.name.upper() == "DICOMDIR"))


# --- 1. headers -------------------------------------------------------------------------------


def read_study(source: str | Path, max_files: int = MAX_STUDY_FILES,
               data: bytes | dict[str, bytes] | None = None) -> Study:
    """Every DICOM image's header in a folder, zip or DICOMDIR, grouped into series and ordered; `data`: a zip's
    bytes, or a folder's files by relative name, already in memory (`source` then only names it)."""
    path = Path(source)
    label = str(source)
    if isinstance(data, dict):
        if len(data) > max_files:
            raise ImageError(f"{label}: more than {max_files} files; point at one series' folder")
        kind, headers, skipped = "folder", *_memory_headers(data)
    elif data is not None:
        kind, headers, skipped = "zip", *_zip_headers(io.BytesIO(data), label, max_files)
    elif path.is_dir():
        kind, headers, skipped = "folder", *_folder_headers(path, label, max_files)
    elif path.suffix.lower() == ".zip":
        kind, headers, skipped = "zip", *_zip_headers(path, label, max_files)
    else:
        kind, headers, skipped = "DICOMDIR", *_dicomdir_headers(path, label, max_files)
    if not headers:
        raise ImageError(f"{label}: no DICOM images in this {kind}"
                         + (f" ({skipped} file(s) that are not DICOM images)" if skipped else ""))
    return Study(label, kind, _group(headers), skipped, data)


def _folder_files(root: Path, label: str, max_files: int) -> list[str]:
    files = []
    for here, dirs, names in os.walk(root):  # symbolic links to folders are not followed: no loops
        dirs.sort()
        for name in sorted(names):
            if name.startswith("."):
                continue
            files.append(os.path.relpath(os.path.join(here, name), root))
            if len(files) > max_files:
                raise ImageError(f"{label}: more than {max_files} files; point at one series' folder")
    return files


def _tally(found) -> tuple[list, int]:
    """Headers, and how many files were not DICOM images (None), from one reader's results."""
    headers = [h for h in found if h is not None]
    return headers, len(found) - len(headers)


def _file_header(full: Path, rel: str):
    try:
        if not full.is_file():
            return None
        with open(full, "rb") as f:
            return _header(f, rel)
    except OSError:
        return None


def _folder_headers(root: Path, label: str, max_files: int):
    return _tally([_file_header(root / rel, rel) for rel in _folder_files(root, label, max_files)])


def _memory_headers(files: dict[str, bytes]):
    return _tally([_header(io.BytesIO(files[name]), name) for name in sorted(files)])


def _zip_members(path, label: str, max_files: int) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ImageError(f"{label}: not a readable zip file ({exc})") from None
    members = [i for i in zf.infolist() if not i.is_dir() and not Path(i.filename).name.startswith(".")]
    if len(members) > max_files:
        zf.close()
        raise ImageError(f"{label}: more than {max_files} files; zip one series")
    return zf, members


def _zip_headers(path, label: str, max_files: int):
    zf, members = _zip_members(path, label, max_files)
    with zf:
        return _tally([_member_header(zf, info) for info in members])


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo):
    if info.file_size > MAX_SLICE_BYTES or info.flag_bits & 0x1:  # oversized, or encrypted: skipped
        return None
    try:
        with zf.open(info) as f:
            return _header(io.BytesIO(f.read(min(info.file_size, 1 << 20))), info.filename)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError):
        return None


def _dicomdir_headers(path: Path, label: str, max_files: int):
    import pydicom
    from pydicom.fileset import FileSet

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) != _DICOMDIR_CLASS:
                raise ImageError(f"{label}: named DICOMDIR but not a DICOMDIR file")
            instances = list(FileSet(ds))
    except ImageError:
        raise
    except Exception as exc:  # a damaged or hostile directory: one line
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ImageError(f"{label}: not a readable DICOMDIR ({detail})") from None
    if len(instances) > max_files:
        raise ImageError(f"{label}: lists more than {max_files} files; open one series' folder instead")
    root = path.parent.resolve()
    return _tally([_record_header(root, instance) for instance in instances])


def _record_header(root: Path, instance):
    """The header of the file a DICOMDIR record names; None for one pointing outside the study."""
    try:
        full = Path(instance.path).resolve()
    except (OSError, ValueError, AttributeError):
        return None
    if root not in full.parents:
        return None
    return _file_header(full, os.path.relpath(full, root))


@dataclass(frozen=True)
class _Header:
    name: str
    series_uid: str
    series_number: int | None
    description: str
    modality: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    instance: int | None
    rows: int
    cols: int
    frames: int


def _header(f, name: str) -> _Header | None:
    """The header of one file, or None when it is not a DICOM image (or not readable: a hostile file is
    skipped here and counted, never decoded)."""
    import logging

    import pydicom

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    head = f.read(132)
    f.seek(0)
    if head[128:132] != b"DICM" and not name.lower().endswith((".dcm", ".dicom")):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            rows, cols = _int(ds.get("Rows")), _int(ds.get("Columns"))
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            if not rows or not cols:
                return None  # not an image: a report, a structure set, the DICOMDIR
            return _Header(name, uid or "(none)", _int(ds.get("SeriesNumber")),
                           _text(ds.get("SeriesDescription")), _text(ds.get("Modality")),
                           _floats(ds.get("ImagePositionPatient"), 3), _floats(ds.get("ImageOrientationPatient"), 6),
                           _int(ds.get("InstanceNumber")), rows, cols, max(1, _int(ds.get("NumberOfFrames")) or 1))
    except Exception:  # pydicom raises many kinds on damaged values
        return None


def _int(value) -> int | None:
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def _text(value) -> str:
    return "".join(c for c in str(value or "") if c.isprintable())[:64].strip()


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _group(headers: list[_Header]) -> tuple[Series, ...]:
    by_uid: dict[str, list[_Header]] = {}
    for h in headers:
        by_uid.setdefault(h.series_uid, []).append(h)
    series = [_series(uid, hs) for uid, hs in by_uid.items()]
    series.sort(key=lambda s: (s.number is None, s.number or 0, s.uid))
    return tuple(series)


def _series(uid: str, headers: list[_Header]) -> Series:
    first = headers[0]
    normal = None
    if first.orientation is not None:
        n = np.cross(np.array(first.orientation[:3]), np.array(first.orientation[3:]))
        normal = n / np.linalg.norm(n) if np.linalg.norm(n) > 0 else None
    if normal is not None and all(h.position is not None for h in headers):
        def place(h: _Header) -> float:
            return float(np.dot(np.array(h.position), normal))
        ordered, by = sorted(headers, key=lambda h: (place(h), h.instance or 0, h.name)), "position"
        positions = [round(place(h), 2) for h in ordered]
    elif all(h.instance is not None for h in headers):
        ordered, by, positions = sorted(headers, key=lambda h: (h.instance, h.name)), "instance number", None
    else:
        ordered, by, positions = sorted(headers, key=lambda h: h.name), "file name", None
    slices = []
    for k, h in enumerate(ordered):
        for frame in range(h.frames):  # a multi-frame file's frames are slices in their stored order
            slices.append(SliceRef(h.name, frame if h.frames > 1 else None,
                                   positions[k] if positions and h.frames == 1 else None, h.instance,
                                   h.rows * h.cols))
    return Series(uid, first.series_number, first.modality, first.description, tuple(slices), by)


# --- 2. the choice ----------------------------------------------------------------------------


def choose_series(study: Study, choice: str | None) -> Series:
    """`--series N` (the series number, or its place in the list) or a SeriesInstanceUID; a study of one
    series needs none. Several and no choice: one line listing them."""
    listing = "; ".join(f"{k}) {s.label()}" for k, s in enumerate(study.series, 1))
    if choice is None or str(choice).strip() == "":
        if len(study.series) == 1:
            return study.series[0]
        raise ImageError(f"{study.source}: {len(study.series)} series, choose one with --series N: {listing}")
    text = str(choice).strip()
    for s in study.series:
        if s.uid == text:
            return s
    if text.isdigit():
        k = int(text)
        numbered = [s for s in study.series if s.number == k]
        if len(numbered) == 1:
            return numbered[0]
        if 1 <= k <= len(study.series):
            return study.series[k - 1]
    raise ImageError(f"{study.source}: no series {text}; the study has: {listing}")


def choose_slices(series: Series, spec: str | None, montage: tuple[int, int] | None, label: str) -> list[int]:
    """The slices' places in the ordered series for `--slices`:

    auto (the default)  evenly spaced through the series, as many as the montage has cells, else one (the
                        middle); `auto:N` for N. Spaced by position where positions are known, so a gap in
                        the series does not bunch the choice.
    A:B[:S]             a range, as Python's slices (B excluded; negative counts from the end)
    I,J,K               those slices (0 is the first)
    """
    n = len(series.slices)
    text = (spec or "auto").strip().lower()
    cells = montage[0] * montage[1] if montage else None
    try:
        if text == "auto" or text.startswith("auto:"):
            count = int(text[5:]) if text.startswith("auto:") else (cells or 1)
            if count < 1:
                raise ValueError
            chosen = _evenly_spaced(series, min(count, n))
        elif ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if len(parts) > 3 or (len(parts) == 3 and parts[2] == 0):
                raise ValueError
            chosen = list(range(n))[slice(*parts)]
        else:
            chosen = []
            for p in text.split(","):
                k = int(p)
                if not -n <= k < n:
                    raise ImageError(f"{label}: --slices {spec}: slice {k} is out of range (the series has {n}, "
                                     f"0-{n - 1})")
                chosen.append(k % n)
    except ValueError:
        raise ImageError(f"{label}: --slices {spec}: give auto, auto:N, a range A:B:STEP or indices I,J,K") from None
    if not chosen:
        raise ImageError(f"{label}: --slices {spec} chooses no slice (the series has {n}, 0-{n - 1})")
    limit = cells or MAX_IMAGES
    if len(chosen) > limit:
        how = (f"the {montage[0]}x{montage[1]} montage has {cells} cells" if montage
               else f"the model takes at most {MAX_IMAGES} images; tile them with --montage RxC")
        raise ImageError(f"{label}: --slices {spec} chooses {len(chosen)} slices, but {how}")
    pixels = sum(series.slices[k].pixels for k in chosen)
    if pixels > MAX_CHOSEN_PIXELS:
        raise ImageError(f"{label}: the chosen slices hold {pixels} pixels, more than {MAX_CHOSEN_PIXELS}; "
                         "choose fewer")
    return chosen


def _evenly_spaced(series: Series, count: int) -> list[int]:
    n = len(series.slices)
    positions = [s.position for s in series.slices]
    if all(p is not None for p in positions) and positions[-1] != positions[0]:
        first, last = positions[0], positions[-1]
        targets = [first + (k + 0.5) / count * (last - first) for k in range(count)]
        arr = np.array(positions, dtype=np.float64)
        chosen = [int(np.argmin(np.abs(arr - t))) for t in targets]
    else:
        chosen = [min(n - 1, int((k + 0.5) * n / count)) for k in range(count)]
    return sorted(dict.fromkeys(chosen))  # distinct, in order


def parse_montage(text: str | None) -> tuple[int, int] | None:
    """'3x3' → (3, 3): rows and columns of a montage."""
    if not text:
        return None
    try:
        rows, cols = (int(x) for x in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise ImageError(f"--montage {text}: give ROWSxCOLUMNS, e.g. 2x2 or 3x3") from None
    if not (1 <= rows <= MAX_MONTAGE_SIDE and 1 <= cols <= MAX_MONTAGE_SIDE):
        raise ImageError(f"--montage {text}: rows and columns from 1 to {MAX_MONTAGE_SIDE}")
    return rows, cols


def expand(source: str | Path, series: str | None = None, slices: str | None = None,
           montage: tuple[int, int] | None = None, window: tuple[float, float] | None = None,
           max_pixels: int = 178_956_970, data: bytes | dict[str, bytes] | None = None) -> list[StudyPicture]:
    """The pictures a study gives: one per chosen slice, or one montage of them all (`data`: a zip in memory)."""
    study = read_study(source, data=data)
    chosen_series = choose_series(study, series)
    label = f"{study.source} (series {chosen_series.number if chosen_series.number is not None else '?'})"
    chosen = choose_slices(chosen_series, slices, montage, label)
    if montage:
        return [StudyPicture(study, chosen_series, tuple(chosen), montage, window, max_pixels)]
    return [StudyPicture(study, chosen_series, (k,), None, window, max_pixels) for k in chosen]


# --- 3. pixels --------------------------------------------------------------------------------


def _slice_bytes(study: Study, ref: SliceRef):
    """An open binary file of one slice: from the folder, or the zip member read in memory."""
    if isinstance(study.data, dict):
        return io.BytesIO(study.data[ref.name])
    if study.kind == "zip":
        with zipfile.ZipFile(io.BytesIO(study.data) if study.data is not None else study.source) as zf:
            info = zf.getinfo(ref.name)
            if info.file_size > MAX_SLICE_BYTES:
                raise ImageError(f"{study.source}: {ref.name} is larger than {MAX_SLICE_BYTES >> 20} MiB")
            with zf.open(info) as f:
                data = f.read(MAX_SLICE_BYTES + 1)
            if len(data) > MAX_SLICE_BYTES:  # the member's size in the directory lied
                raise ImageError(f"{study.source}: {ref.name} unpacks to more than {MAX_SLICE_BYTES >> 20} MiB")
            return io.BytesIO(data)
    root = Path(study.source) if study.kind == "folder" else Path(study.source).parent
    return open(root / ref.name, "rb")


def _read_slice(picture: StudyPicture, k: int, window: tuple[float, float] | None) -> Image.Image:
    ref = picture.series.slices[k]
    label = f"{picture.study.source}: {ref.name}"
    try:
        with _slice_bytes(picture.study, ref) as f:
            return read_dicom(f, window, ref.frame, picture.max_pixels, label=label)
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise ImageError(f"{label}: cannot read ({exc})") from None


def render(picture: StudyPicture) -> Image.Image:
    """The RGB picture: the slice, or the montage; one window for every slice (the chosen one, else the
    middle chosen slice's), and `.info` saying where it came from."""
    middle = picture.indices[len(picture.indices) // 2]
    first = _read_slice(picture, middle, picture.window)
    used: Window | None = first.info.get(WINDOW_INFO)
    window = picture.window
    if window is None and used is not None and used.center is not None and used.width is not None:
        window = (used.center, used.width)  # the same contrast across the series
    pictures = {middle: first}
    for k in picture.indices:
        if k not in pictures:
            pictures[k] = _read_slice(picture, k, window)
    if picture.montage:
        img = _montage(picture, [pictures[k] for k in picture.indices])
    else:
        img = first
    img.info[WINDOW_INFO] = used if picture.window is None else Window(*picture.window, "chosen")
    img.info[SOURCE_INFO] = source_record(picture, used if picture.window is None else img.info[WINDOW_INFO])
    return img


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _montage(picture: StudyPicture, slices: list[Image.Image]) -> Image.Image:
    rows, cols = picture.montage or (1, 1)
    cell = min(MONTAGE_CELL, max(max(s.size) for s in slices))
    canvas = Image.new("RGB", (cols * cell, rows * cell), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, cell // 14))
    for place, (k, img) in enumerate(zip(picture.indices, slices)):
        scale = cell / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        tile = img.resize(size, Image.Resampling.LANCZOS) if size != img.size else img
        x, y = (place % cols) * cell, (place // cols) * cell
        canvas.paste(tile, (x + (cell - size[0]) // 2, y + (cell - size[1]) // 2))
        # Each tile says which slice it is, so an answer that names "the third image" can be traced.
        draw.text((x + 4, y + 2), _slice_label(picture.series, k), fill=(255, 255, 0), font=font,
                  stroke_width=2, stroke_fill=(0, 0, 0))
    return canvas


def _slice_label(series: Series, k: int) -> str:
    ref = series.slices[k]
    return f"{k}  {ref.position:+.1f} mm" if ref.position is not None else f"{k}"


def source_record(picture: StudyPicture, window: Window | None) -> dict:
    """Where a study's picture came from, as a record keeps it: no patient field, the series UID as a digest."""
    refs = [picture.series.slices[k] for k in picture.indices]
    return {
        "study": picture.study.source, "kind": picture.study.kind,
        "series_number": picture.series.number, "series_uid_sha256": picture.series.uid_digest,
        "modality": picture.series.modality, "series_slices": len(picture.series.slices),
        "ordered_by": picture.series.ordered_by, "slices": list(picture.indices),
        "files": [r.name for r in refs], "frames": [r.frame for r in refs],
        "positions_mm": [r.position for r in refs] if all(r.position is not None for r in refs) else None,
        "montage": f"{picture.montage[0]}x{picture.montage[1]}" if picture.montage else None,
        "window": window_record(window),
    }


def window_record(window: Window | None) -> dict | None:
    if window is None:
        return None
    return {"center": window.center, "width": window.width, "source": window.source}
