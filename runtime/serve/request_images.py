"""The images of a request: `data:` URIs decoded in memory, `file://` paths read inside `--allow-files`
through descriptors, every picture made with the same loader as `chat`."""

from __future__ import annotations

import base64
import binascii
import errno
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from huatuo_local.models.errors import HuatuoError
from huatuo_local.runtime.core.items import ImageItem, image_item
from huatuo_local.runtime.images.dicom import WINDOW_INFO, Window, parse_window
from huatuo_local.runtime.images.loader import (
    ImageData,
    LoadOptions,
    frame_count,
    image_source,
    load_rgb,
    prepare,
)
from huatuo_local.runtime.images.study import MAX_STUDY_FILES, expand, is_zip, parse_montage, render
from huatuo_local.runtime.serve.errors import ApiError, bad_request

_DICOM_MIMES = ("application/dicom", "image/dicom")
# A server decodes what any client sends: 50 megapixels (the padded square included) holds every
# radiograph and mammogram (a 5624-pixel side is 31.6 M) and keeps one decode within ~0.3 GB.
SERVE_MAX_PIXELS = 50_000_000


@dataclass(frozen=True)
class Preview:
    item: ImageItem
    frames: int
    window: Window | None  # the grayscale window used (DICOM and 16-bit images), None for 8-bit pictures


@dataclass(frozen=True)
class StudyFolder:
    """A folder sent as file:// (a DICOM study): its files, read into memory through descriptors."""

    data: dict[str, bytes]
    name: str


@dataclass
class Limits:
    max_image_bytes: int = 32 * 1024 * 1024
    max_pixels: int = SERVE_MAX_PIXELS
    allow_files: list[Path] = field(default_factory=list)


# Loader messages speak to CLI users; a client is told the request field or the server's option instead.
_FIELD_NAMES = (("--max-pixels", "the server's --max-pixels"), ("--frame", "'frame'"), ("--window", "'window'"),
                ("--series", "'series'"), ("--slices", "'slices'"), ("--montage", "'montage'"))


def _client_name(name: str | None) -> str:
    """The file name a client gave for an upload (the `name` extension field), as messages may show it:
    printable, at most 120 characters. It is only ever echoed back to that client, never written."""
    if not name:
        return ""
    shown = "".join(c for c in name if c.isprintable())[:120].strip()
    return shown


def _study_fields(spec: dict, where: str) -> tuple[str | None, str | None, tuple[int, int] | None]:
    """A zipped study's extension fields beside `url`: `series`, `slices`, `montage` (as chat's flags)."""
    series, slices, montage = spec.get("series"), spec.get("slices"), spec.get("montage")
    if series is not None and (isinstance(series, bool) or not isinstance(series, (str, int))):
        raise bad_request("'series' must be a series number or a SeriesInstanceUID", where)
    for name, value in (("slices", slices), ("montage", montage)):
        if value is not None and (not isinstance(value, str) or len(value) > 200):
            raise bad_request(f"'{name}' must be a string such as " + ('"auto:4"' if name == "slices" else '"3x3"'),
                              where)
    try:
        tiles = parse_montage(montage)
    except HuatuoError as exc:
        raise bad_request(_for_client(str(exc)), where) from None
    return (None if series is None else str(series)), slices, tiles


def _for_client(message: str) -> str:
    for flag, field_name in _FIELD_NAMES:
        message = message.replace(flag, field_name)
    return message


class ImageLoader:
    """Turns one `image_url` part into the picture the model sees, with the same loader as `chat`.

    Images are decoded from memory (uploads never touch the disk), a bounded number at a time
    (decoding is where a small file can cost a lot of memory), and not at all once the request
    that wants them is gone.
    """

    def __init__(self, limits: Limits, vision, max_decodes: int = 1):
        self.limits, self.vision = limits, vision
        self._decodes = threading.BoundedSemaphore(max_decodes)
        self.decoded = 0  # images decoded so far (/health says it: what a departed client cost is countable)
        # Each allowed folder as given and as resolved, once: a client's path is matched against
        # either, then opened from the resolved folder's descriptor without following links.
        self._roots = [(Path(os.path.abspath(p)), p.resolve()) for p in limits.allow_files]

    def load(self, part: dict, where: str, cancelled: Callable[[], bool] | None = None) -> ImageItem:
        """The picture the model sees for one image part."""
        return self._load(part, where, cancelled).item

    def _load(self, part: dict, where: str, cancelled: Callable[[], bool] | None = None) -> Preview:
        spec = part.get("image_url")
        if isinstance(spec, str):
            spec = {"url": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
            raise bad_request("an image_url part needs {'url': ...}", where)
        url = spec["url"]
        window = spec.get("window")
        if window is not None and not isinstance(window, str):
            raise bad_request("'window' must be a string: a preset (lung, bone, ...) or \"CENTER,WIDTH\"", where)
        try:
            window = parse_window(window)
        except HuatuoError as exc:
            raise bad_request(_for_client(str(exc)), where) from None
        frame = spec.get("frame")
        if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < 1 << 31):
            raise bad_request("'frame' must be a non-negative integer", where)
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise bad_request("'name' must be a string: the file's name, used in error messages", where)
        study = _study_fields(spec, where)
        options = LoadOptions(window, frame, self.limits.max_pixels, *study)
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data: ImageData | StudyFolder = self._from_data(url, where, name)
        elif scheme == "file":
            data = self._from_file(url, where)
        elif scheme in ("http", "https"):
            raise bad_request("the server never fetches URLs (images stay on this machine); send the image as a data: "
                       "URI, e.g. data:image/png;base64,...", where, "url_not_allowed")
        else:
            raise bad_request(f"unsupported image URL scheme {scheme[:20] or '(none)'!r}; use a data: URI", where)
        with self._decodes:
            if cancelled is not None and cancelled():
                raise ApiError(499, "the client went away", code="client_closed")
            self.decoded += 1
            return self._prepare(data, options, where)

    def _from_data(self, url: str, where: str, name: str | None = None) -> ImageData:
        head, sep, payload = url.partition(",")
        if not sep or not head.lower().endswith(";base64"):
            raise bad_request("image data URIs must be base64: data:MIME;base64,...", where)
        if len(payload) * 3 // 4 > self.limits.max_image_bytes:
            raise ApiError(413, f"image larger than {self.limits.max_image_bytes // (1024 * 1024)} MB",
                           param=where, code="image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("the image's base64 data is invalid", where) from None
        mime = head[5:-7].lower()
        return ImageData(data, _client_name(name) or "the uploaded image", dicom=mime in _DICOM_MIMES)

    def _from_file(self, url: str, where: str) -> ImageData:
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise bad_request("file:// URLs name a file on this machine: file:///path", where)
        try:
            text = unquote(parsed.path, errors="strict")
        except UnicodeDecodeError:
            raise bad_request("file:// URLs must be UTF-8 paths", where) from None
        if "\x00" in text or not text.startswith("/"):
            raise bad_request("file:// URLs need an absolute path without NUL characters", where)
        parts = PurePosixPath(text).parts
        if any(p in (".", "..") for p in parts):
            raise bad_request("file:// paths may not contain '.' or '..'", where)
        for given, resolved in self._roots:
            for root in dict.fromkeys((given, resolved)):
                if parts[: len(root.parts)] == root.parts and len(parts) >= len(root.parts):
                    found = self._read_below(resolved, parts[len(root.parts):], where)
                    if isinstance(found, dict):  # a folder: a DICOM study, its files read into memory
                        return StudyFolder(found, text)
                    return ImageData(found, text)
        raise ApiError(403 if self._roots else 400,
                       "file:// images are only read inside the folders the server was started with "
                       "(--allow-files DIR)", param=where, code="file_not_allowed")

    def _read_below(self, root: Path, names: tuple[str, ...], where: str) -> bytes | dict[str, bytes]:
        """Read root/names... opened once, each step from its folder's descriptor without following a link,
        so a folder swapped for a link while we read cannot lead outside the allowed folder. A folder (a DICOM
        study) gives its files, read the same way."""
        fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
        try:
            for name in names[:-1]:
                fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
            if names:
                fds.append(os.open(names[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fds[-1]))
            info = os.fstat(fds[-1])
            if stat.S_ISDIR(info.st_mode):
                return self._read_folder(fds[-1], where)
            if not stat.S_ISREG(info.st_mode):
                raise bad_request("file:// images must be regular files or folders", where)
            if info.st_size > self.limits.max_image_bytes:
                raise ApiError(413, "image file too large", param=where, code="image_too_large")
            with os.fdopen(os.dup(fds[-1]), "rb") as f:
                data = f.read(self.limits.max_image_bytes + 1)
            if len(data) > self.limits.max_image_bytes:
                raise ApiError(413, "image file too large", param=where, code="image_too_large")
            return data
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                raise bad_request("file:// paths may not go through symbolic links", where) from None
            if exc.errno == errno.ENOENT:
                raise bad_request("no such file inside the allowed folders", where) from None
            raise bad_request(f"cannot read that file ({exc.strerror})", where) from None
        finally:
            for fd in fds:
                os.close(fd)

    def _study(self, data: ImageData | StudyFolder, options: LoadOptions, where: str) -> Preview:
        pictures = expand(data.name, options.series, options.slices, options.montage, options.window,
                          options.max_pixels, data=data.data)
        if len(pictures) != 1:
            raise bad_request(f"this study gives {len(pictures)} pictures; an image part is one picture: choose one "
                              "slice with 'slices', tile them with 'montage' (e.g. \"3x3\"), or send one part per "
                              "slice", where)
        picture = render(pictures[0])
        return Preview(image_item(prepare(picture, self.vision), image_source(pictures[0], picture)), 1,
                       picture.info.get(WINDOW_INFO))

    def _read_folder(self, fd: int, where: str) -> dict[str, bytes]:
        """Every regular file below the folder open as `fd`, walked through descriptors without following links
        (a link is skipped), at most MAX_STUDY_FILES files and 16x the image size limit in all."""
        files: dict[str, bytes] = {}
        total, budget = 0, 16 * self.limits.max_image_bytes
        for top, dirs, names, dir_fd in os.fwalk(".", dir_fd=fd, follow_symlinks=False):
            dirs.sort()
            for name in sorted(names):
                if name.startswith("."):
                    continue
                try:
                    f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
                except OSError:  # a link, or gone: not part of the study
                    continue
                try:
                    info = os.fstat(f)
                    if not stat.S_ISREG(info.st_mode):
                        continue
                    total += info.st_size
                    if total > budget or len(files) >= MAX_STUDY_FILES:
                        raise ApiError(413, f"the study folder holds more than {budget >> 20} MB or "
                                       f"{MAX_STUDY_FILES} files; point at one series' folder", param=where,
                                       code="image_too_large")
                    with os.fdopen(os.dup(f), "rb") as fh:
                        files[os.path.normpath(os.path.join(top, name))] = fh.read(info.st_size)
                finally:
                    os.close(f)
        return files

    def preview(self, spec: dict, cancelled: Callable[[], bool] | None = None) -> Preview:
        """What the model will see for one image part, how many frames the file has, and the window used."""
        return self._load({"image_url": spec}, "image", cancelled)

    def _prepare(self, data: ImageData | StudyFolder, options: LoadOptions, where: str) -> Preview:
        try:
            # A DICOM study (zipped, or a folder read into memory): one picture per image part.
            if isinstance(data, StudyFolder) or is_zip(data.data):
                return self._study(data, options, where)
            picture = load_rgb(data, options)
            return Preview(image_item(prepare(picture, self.vision), image_source(data, picture)), frame_count(data),
                           picture.info.get(WINDOW_INFO))
        except HuatuoError as exc:
            message = _for_client(str(exc))
            status = 413 if "too large" in message else 400
            raise ApiError(status, message, param=where,
                           code="image_too_large" if status == 413 else "invalid_image") from None


