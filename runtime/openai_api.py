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
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from huatuo_local.models import defaults
from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.prompt import MAX_IMAGES, Turn

from .dicom import parse_window
from .images import DEFAULT_MAX_PIXELS, LoadOptions, load_rgb, prepare
from .items import ImageItem, image_item
from .sampling import SamplingParams

_MIME_SUFFIX = {
    "image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/tiff": ".tif", "image/bmp": ".bmp",
    "image/gif": ".gif", "image/webp": ".webp", "application/dicom": ".dcm", "image/dicom": ".dcm",
    "application/octet-stream": "",
}


class ApiError(Exception):
    """An error for the client, in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_image_bytes: int = 32 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
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


def _number(body: dict, key: str, lo: float, hi: float, default, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _bad(f"'{key}' must be {'an integer' if integer else 'a number'}", key)
    if not lo <= value <= hi:
        raise _bad(f"'{key}' must be between {lo} and {hi}", key)
    return value


def sampling_from(body: dict) -> tuple[SamplingParams, int | None, list[str]]:
    n = body.get("n", 1)
    if n != 1:
        raise _bad("only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise _bad(f"'{key}' must be a positive integer", key)
    params = SamplingParams(
        temperature=float(_number(body, "temperature", 0, 2, defaults.TEMPERATURE)),
        top_p=float(_number(body, "top_p", 0, 1, defaults.TOP_P)),
        top_k=int(_number(body, "top_k", 0, 1 << 20, defaults.TOP_K, integer=True)),
        repetition_penalty=float(_number(body, "repetition_penalty", 0.01, 10, defaults.REPETITION_PENALTY)),
        max_new_tokens=int(max_tokens or defaults.MAX_NEW_TOKENS),
    )
    # vLLM's extension: at least this many new tokens (eos is masked until then); benchmarks use it
    # to make every answer the same length.
    min_tokens = int(_number(body, "min_tokens", 0, params.max_new_tokens, defaults.MIN_NEW_TOKENS, integer=True))
    params.min_new_tokens = max(defaults.MIN_NEW_TOKENS, min_tokens)
    if params.top_p == 0:
        raise _bad("'top_p' must be greater than 0", "top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("'seed' must be an integer", "seed")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = list(stop)
    else:
        raise _bad("'stop' must be a string or a list of at most 4 strings", "stop")
    return params, seed, [s for s in stops if s]


class ImageLoader:
    """Turns one `image_url` part into the picture the model sees, with the same loader as `chat`."""

    def __init__(self, limits: Limits, vision):
        self.limits, self.vision = limits, vision

    def load(self, part: dict, where: str) -> ImageItem:
        """The picture the model sees for one image part."""
        return self._load(part, where)[0]

    def _load(self, part: dict, where: str) -> tuple[ImageItem, int]:
        spec = part.get("image_url")
        if isinstance(spec, str):
            spec = {"url": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
            raise _bad("an image_url part needs {'url': ...}", where)
        url = spec["url"]
        try:
            window = parse_window(spec["window"]) if spec.get("window") is not None else None
        except HuatuoError as exc:
            raise _bad(str(exc).replace("--window", "'window'"), where) from None
        frame = spec.get("frame")
        if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int)):
            raise _bad("'frame' must be an integer", where)
        options = LoadOptions(window, frame, self.limits.max_pixels)
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return self._from_data(url, options, where)
        if scheme == "file":
            return self._from_file(url, options, where)
        if scheme in ("http", "https"):
            raise _bad("the server never fetches URLs (images stay on this machine); send the image as a data: "
                       "URI, e.g. data:image/png;base64,...", where, "url_not_allowed")
        raise _bad(f"unsupported image URL scheme {scheme or '(none)'!r}; use a data: URI", where)

    def _from_data(self, url: str, options: LoadOptions, where: str) -> tuple[ImageItem, int]:
        head, sep, payload = url.partition(",")
        if not sep or not head.lower().endswith(";base64"):
            raise _bad("image data URIs must be base64: data:MIME;base64,...", where)
        mime = head[5:-7].lower()
        if len(payload) * 3 // 4 > self.limits.max_image_bytes:
            raise ApiError(413, f"image larger than {self.limits.max_image_bytes // (1024 * 1024)} MB",
                           param=where, code="image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("the image's base64 data is invalid", where) from None
        suffix = _MIME_SUFFIX.get(mime, "")
        # The loader reads files (pydicom, Pillow): a private temporary file, deleted at once.
        fd, tmp = tempfile.mkstemp(prefix="huatuo-image-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return self._prepare(Path(tmp), options, where, "the uploaded image")
        finally:
            os.unlink(tmp)

    def _from_file(self, url: str, options: LoadOptions, where: str) -> tuple[ImageItem, int]:
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise _bad("file:// URLs name a file on this machine: file:///path", where)
        path = Path(unquote(parsed.path))
        real = path.resolve()
        if not any(real == root or root in real.parents for root in self.limits.allow_files):
            raise ApiError(403 if self.limits.allow_files else 400,
                           "file:// images are only read inside the folders the server was started with "
                           "(--allow-files DIR)", param=where, code="file_not_allowed")
        if real.is_file() and real.stat().st_size > self.limits.max_image_bytes:
            raise ApiError(413, "image file too large", param=where, code="image_too_large")
        return self._prepare(real, options, where, str(path))

    def preview(self, spec: dict) -> tuple[ImageItem, int]:
        """What the model will see for one image part, and how many frames the file has."""
        return self._load({"image_url": spec}, "image")

    def _prepare(self, path: Path, options: LoadOptions, where: str, label: str) -> tuple[ImageItem, int]:
        try:
            return image_item(prepare(load_rgb(path, options), self.vision)), frame_count(path)
        except HuatuoError as exc:
            message = str(exc).replace(str(path), label).replace("--max-pixels", "the server's --max-pixels")
            status = 413 if "too large" in message else 400
            raise ApiError(status, message, param=where,
                           code="image_too_large" if status == 413 else "invalid_image") from None


def frame_count(path: Path) -> int:
    """Frames of a DICOM or multi-frame image, read from the header only (1 when unknown)."""
    from .dicom import is_dicom

    try:
        if is_dicom(path):
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return max(1, int(ds.get("NumberOfFrames", 1) or 1))
        from PIL import Image

        with Image.open(path) as img:
            return max(1, int(getattr(img, "n_frames", 1)))
    except Exception:  # the loader that follows reports the real problem
        return 1


def _text_and_images(content, role: str, index: int, loader: ImageLoader | None) -> tuple[str, list[ImageItem]]:
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return content, []
    if content is None and role == "assistant":
        return "", []
    if not isinstance(content, list):
        raise _bad("content must be a string or a list of parts", where)
    texts, images = [], []
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
            assert loader is not None
            images.append(loader.load(part, f"{where}[{j}]"))
        else:
            raise _bad(f"content part type {part['type']!r} is not supported (text, image_url)", f"{where}[{j}]")
    return "\n".join(texts), images


def parse_chat(body: object, loader: ImageLoader) -> ChatRequest:
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
    turns: list[Turn] = []
    images: list[ImageItem] = []
    system: list[str] = []
    pending: tuple[str, list[ImageItem]] | None = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise _bad("each message needs a role: system, user or assistant", f"messages[{i}]")
        role = message["role"]
        text, pics = _text_and_images(message.get("content"), role, i, loader)
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            if pending is not None:
                raise _bad("two user messages in a row; alternate user and assistant", f"messages[{i}]")
            if system:
                text = "\n\n".join([*system, text])
                system = []
            pending = (text, pics)
        else:
            if pending is None:
                raise _bad("an assistant message must follow a user message", f"messages[{i}]")
            turns.append(Turn(pending[0], len(pending[1]), text))
            images.extend(pending[1])
            pending = None
    if pending is None:
        raise _bad("the last message must be from the user", "messages")
    turns.append(Turn(pending[0], len(pending[1])))
    images.extend(pending[1])
    if len(images) > MAX_IMAGES:
        raise _bad(f"at most {MAX_IMAGES} images per conversation (the release's limit)", "messages")
    model = body.get("model")
    return ChatRequest(turns, images, params, seed, stream, bool(options.get("include_usage")), stop,
                       model if isinstance(model, str) else None)
