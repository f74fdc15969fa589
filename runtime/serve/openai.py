"""OpenAI's chat-completions request, translated into the release's conversation; errors in OpenAI's shape.

No HTTP here (runtime/server.py has that): a request body in, a `ChatRequest` out, or an
`ApiError` that names the parameter and the fix.

- `messages`: `user` and `assistant` turns in order, ending with `user`. Content is a string or
  a list of parts: `{"type": "text", "text": ...}` and `{"type": "image_url", "image_url":
  {"url": ...}}`. A turn's images go before its text, as in the release. `system` messages
  (the release has no system prompt) are prepended to the next user message's text, followed
  by a blank line; without them the prompt is exactly `chat`'s.
- Images: `data:` URIs (PNG, JPEG, TIFF, BMP, GIF, WebP, DICOM); `file://` paths only inside
  the folders given with `--allow-files`; http(s) URLs are refused (the server never fetches).
  Extension fields beside `url`: `window` (`lung`, ... or `C,W`) and `frame` (multi-frame
  files), as `chat --window/--frame`.
- Sampling: `temperature`, `top_p`, `max_tokens` / `max_completion_tokens`, `seed`, `stop`,
  and `repetition_penalty` / `top_k` / `min_tokens` (as vLLM) as extensions; absent ones take the release's defaults
  (temperature 0.2, repetition penalty 1.2, top-k 50, top-p 1, 512 new tokens).
"""

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

from huatuo_local.models import defaults
from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.prompt import MAX_IMAGES, Turn
from huatuo_local.runtime.core.items import ImageItem, image_item
from huatuo_local.runtime.core.sampling import SamplingParams, SettingError
from huatuo_local.runtime.images.dicom import parse_window
from huatuo_local.runtime.images.loader import ImageData, LoadOptions, frame_count, load_rgb, prepare

_DICOM_MIMES = ("application/dicom", "image/dicom")


class ApiError(Exception):
    """An error for the client, in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# A server decodes what any client sends: 50 megapixels (the padded square included) holds every
# radiograph and mammogram (a 5624-pixel side is 31.6 M) and keeps one decode within ~0.3 GB.
SERVE_MAX_PIXELS = 50_000_000


@dataclass
class Limits:
    max_image_bytes: int = 32 * 1024 * 1024
    max_pixels: int = SERVE_MAX_PIXELS
    allow_files: list[Path] = field(default_factory=list)


@dataclass
class ChatRequest:
    turns: list[Turn]
    images: list[ImageItem]
    params: SamplingParams
    seed: int | None
    stream: bool
    include_usage: bool
    stop: list[str]
    model: str | None


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _number(body: dict, key: str, default, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _bad(f"'{key}' must be {'an integer' if integer else 'a number'}", key)
    return value


def sampling_from(body: dict) -> tuple[SamplingParams, int | None, list[str]]:
    n = body.get("n", 1)
    if n != 1:
        raise _bad("only n=1 is supported", "n")
    # The newer name wins when it holds a value; a null one (clients send it) leaves max_tokens in force.
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    # vLLM's extension min_tokens: at least this many new tokens (eos is masked until then); benchmarks
    # use it to make every answer the same length.
    fields = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
              "repetition_penalty": "repetition_penalty", "max_new_tokens": key, "min_new_tokens": "min_tokens"}
    params = SamplingParams(
        temperature=float(_number(body, "temperature", defaults.TEMPERATURE)),
        top_p=float(_number(body, "top_p", defaults.TOP_P)),
        top_k=int(_number(body, "top_k", defaults.TOP_K, integer=True)),
        repetition_penalty=float(_number(body, "repetition_penalty", defaults.REPETITION_PENALTY)),
        max_new_tokens=int(_number(body, key, defaults.MAX_NEW_TOKENS, integer=True)),
        min_new_tokens=int(_number(body, "min_tokens", defaults.MIN_NEW_TOKENS, integer=True)),
    )
    try:
        params.check()
    except SettingError as exc:
        raise _bad(f"'{fields[exc.setting]}' {exc.detail}", fields[exc.setting]) from None
    if params.min_new_tokens > params.max_new_tokens:
        raise _bad(f"'min_tokens' must not exceed '{key}'", "min_tokens")
    params.min_new_tokens = max(defaults.MIN_NEW_TOKENS, params.min_new_tokens)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(1 << 63) <= seed < 1 << 64):
        raise _bad("'seed' must be a 64-bit integer", "seed")
    if seed is not None:
        seed %= 1 << 64  # OpenAI's seeds are signed; numpy's generators take non-negative ones
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) and len(s) <= 256 for s in stop) and len(stop) <= 4:
        stops = list(stop)
    else:
        raise _bad("'stop' must be a string or a list of at most 4 strings", "stop")
    return params, seed, [s for s in stops if s]


# Loader messages speak to CLI users; a client is told the request field or the server's option instead.
_FIELD_NAMES = (("--max-pixels", "the server's --max-pixels"), ("--frame", "'frame'"), ("--window", "'window'"))


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
        # Each allowed folder as given and as resolved, once: a client's path is matched against
        # either, then opened from the resolved folder's descriptor without following links.
        self._roots = [(Path(os.path.abspath(p)), p.resolve()) for p in limits.allow_files]

    def load(self, part: dict, where: str, cancelled: Callable[[], bool] | None = None) -> ImageItem:
        """The picture the model sees for one image part."""
        return self._load(part, where, cancelled)[0]

    def _load(self, part: dict, where: str, cancelled: Callable[[], bool] | None = None) -> tuple[ImageItem, int]:
        spec = part.get("image_url")
        if isinstance(spec, str):
            spec = {"url": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
            raise _bad("an image_url part needs {'url': ...}", where)
        url = spec["url"]
        window = spec.get("window")
        if window is not None and not isinstance(window, str):
            raise _bad("'window' must be a string: a preset (lung, bone, ...) or \"CENTER,WIDTH\"", where)
        try:
            window = parse_window(window)
        except HuatuoError as exc:
            raise _bad(_for_client(str(exc)), where) from None
        frame = spec.get("frame")
        if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < 1 << 31):
            raise _bad("'frame' must be a non-negative integer", where)
        options = LoadOptions(window, frame, self.limits.max_pixels)
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = self._from_data(url, where)
        elif scheme == "file":
            data = self._from_file(url, where)
        elif scheme in ("http", "https"):
            raise _bad("the server never fetches URLs (images stay on this machine); send the image as a data: "
                       "URI, e.g. data:image/png;base64,...", where, "url_not_allowed")
        else:
            raise _bad(f"unsupported image URL scheme {scheme[:20] or '(none)'!r}; use a data: URI", where)
        with self._decodes:
            if cancelled is not None and cancelled():
                raise ApiError(499, "the client went away", code="client_closed")
            return self._prepare(data, options, where)

    def _from_data(self, url: str, where: str) -> ImageData:
        head, sep, payload = url.partition(",")
        if not sep or not head.lower().endswith(";base64"):
            raise _bad("image data URIs must be base64: data:MIME;base64,...", where)
        if len(payload) * 3 // 4 > self.limits.max_image_bytes:
            raise ApiError(413, f"image larger than {self.limits.max_image_bytes // (1024 * 1024)} MB",
                           param=where, code="image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("the image's base64 data is invalid", where) from None
        mime = head[5:-7].lower()
        return ImageData(data, "the uploaded image.dcm" if mime in _DICOM_MIMES else "the uploaded image")

    def _from_file(self, url: str, where: str) -> ImageData:
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise _bad("file:// URLs name a file on this machine: file:///path", where)
        try:
            text = unquote(parsed.path, errors="strict")
        except UnicodeDecodeError:
            raise _bad("file:// URLs must be UTF-8 paths", where) from None
        if "\x00" in text or not text.startswith("/"):
            raise _bad("file:// URLs need an absolute path without NUL characters", where)
        parts = PurePosixPath(text).parts
        if any(p in (".", "..") for p in parts):
            raise _bad("file:// paths may not contain '.' or '..'", where)
        for given, resolved in self._roots:
            for root in dict.fromkeys((given, resolved)):
                if parts[: len(root.parts)] == root.parts and len(parts) > len(root.parts):
                    return ImageData(self._read_below(resolved, parts[len(root.parts):], where), text)
        raise ApiError(403 if self._roots else 400,
                       "file:// images are only read inside the folders the server was started with "
                       "(--allow-files DIR)", param=where, code="file_not_allowed")

    def _read_below(self, root: Path, names: tuple[str, ...], where: str) -> bytes:
        """Read root/names... opened once, each step from its folder's descriptor without following a link,
        so a folder swapped for a link while we read cannot lead outside the allowed folder."""
        fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
        try:
            for name in names[:-1]:
                fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
            fds.append(os.open(names[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fds[-1]))
            info = os.fstat(fds[-1])
            if not stat.S_ISREG(info.st_mode):
                raise _bad("file:// images must be regular files", where)
            if info.st_size > self.limits.max_image_bytes:
                raise ApiError(413, "image file too large", param=where, code="image_too_large")
            with os.fdopen(os.dup(fds[-1]), "rb") as f:
                data = f.read(self.limits.max_image_bytes + 1)
            if len(data) > self.limits.max_image_bytes:
                raise ApiError(413, "image file too large", param=where, code="image_too_large")
            return data
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                raise _bad("file:// paths may not go through symbolic links", where) from None
            if exc.errno == errno.ENOENT:
                raise _bad("no such file inside the allowed folders", where) from None
            raise _bad(f"cannot read that file ({exc.strerror})", where) from None
        finally:
            for fd in fds:
                os.close(fd)

    def preview(self, spec: dict, cancelled: Callable[[], bool] | None = None) -> tuple[ImageItem, int]:
        """What the model will see for one image part, and how many frames the file has."""
        return self._load({"image_url": spec}, "image", cancelled)

    def _prepare(self, data: ImageData, options: LoadOptions, where: str) -> tuple[ImageItem, int]:
        try:
            return image_item(prepare(load_rgb(data, options), self.vision)), frame_count(data)
        except HuatuoError as exc:
            message = _for_client(str(exc))
            status = 413 if "too large" in message else 400
            raise ApiError(status, message, param=where,
                           code="image_too_large" if status == 413 else "invalid_image") from None


def _text_and_parts(content, role: str, index: int) -> tuple[str, list[tuple[dict, str]]]:
    """A message's text and its image parts (not decoded yet), with where each is in the request."""
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return content, []
    if content is None and role == "assistant":
        return "", []
    if not isinstance(content, list):
        raise _bad("content must be a string or a list of parts", where)
    texts, parts = [], []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _bad("each content part needs a 'type'", f"{where}[{j}]")
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise _bad("a text part needs 'text'", f"{where}[{j}]")
            texts.append(part["text"])
        elif part["type"] == "image_url":
            if role != "user":
                raise _bad("only user messages can hold images", f"{where}[{j}]")
            parts.append((part, f"{where}[{j}]"))
        else:
            raise _bad(f"content part type {part['type'][:40]!r} is not supported (text, image_url)",
                       f"{where}[{j}]")
    return "\n".join(texts), parts


def parse_chat(body: object, loader: ImageLoader, cancelled: Callable[[], bool] | None = None) -> ChatRequest:
    """The request checked in full (structure, sampling, image count) before any image is decoded."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    params, seed, stop = sampling_from(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    # (text, image parts, answer) per turn; system messages go before the next user message's text.
    turns: list[tuple[str, list[tuple[dict, str]], str | None]] = []
    system: list[str] = []
    pending: tuple[str, list[tuple[dict, str]]] | None = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise _bad("each message needs a role: system, user or assistant", f"messages[{i}]")
        role = message["role"]
        text, parts = _text_and_parts(message.get("content"), role, i)
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            if pending is not None:
                raise _bad("two user messages in a row; alternate user and assistant", f"messages[{i}]")
            if system:
                text = "\n\n".join([*system, text])
                system = []
            pending = (text, parts)
        else:
            if pending is None:
                raise _bad("an assistant message must follow a user message", f"messages[{i}]")
            turns.append((*pending, text))
            pending = None
    if pending is None:
        raise _bad("the last message must be from the user", "messages")
    turns.append((*pending, None))
    if sum(len(parts) for _, parts, _ in turns) > MAX_IMAGES:
        raise _bad(f"at most {MAX_IMAGES} images per conversation (the release's limit)", "messages")
    images = [loader.load(part, where, cancelled) for _, parts, _ in turns for part, where in parts]
    model = body.get("model")
    return ChatRequest([Turn(text, len(parts), answer) for text, parts, answer in turns], images, params, seed,
                       stream, bool(options.get("include_usage")), stop, model if isinstance(model, str) else None)
