"""OpenAI's chat-completions request, translated into the release's conversation; errors in OpenAI's shape.

No HTTP here (serve/app.py and the routes have that): a request body in, a `ChatRequest` out, or an
`ApiError` that names the parameter and the fix.

- `messages`: `user` and `assistant` turns in order, ending with `user`. Content is a string or
  a list of parts: `{"type": "text", "text": ...}` and `{"type": "image_url", "image_url":
  {"url": ...}}`. A turn's images go before its text, as in the release. `system` messages
  (the release has no system prompt) are prepended to the next user message's text, followed
  by a blank line; without them the prompt is exactly `chat`'s.
- Images: `data:` URIs (PNG, JPEG, TIFF, BMP, GIF, WebP, DICOM); `file://` paths only inside
  the folders given with `--allow-files`; http(s) URLs are refused (the server never fetches).
  Extension fields beside `url`: `window` (`lung`, ... or `C,W`) and `frame` (multi-frame
  files), as `chat --window/--frame`; a zipped DICOM study (`data:application/zip`, or a .zip by file://) with
  `series`, `slices` and `montage`, as chat's flags, giving one picture per part.
- Sampling: `temperature`, `top_p`, `max_tokens` / `max_completion_tokens`, `seed`, `stop`,
  and `repetition_penalty` / `top_k` / `min_tokens` (as vLLM) as extensions; absent ones take the release's defaults
  (temperature 0.2, repetition penalty 1.2, top-k 50, top-p 1, 512 new tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from huatuo_local.models import defaults
from huatuo_local.models.prompt import MAX_IMAGES, Turn
from huatuo_local.runtime.core.items import ImageItem
from huatuo_local.runtime.core.sampling import SamplingParams, SettingError
from huatuo_local.runtime.core.structured import Grammar, SchemaError
from huatuo_local.runtime.serve.errors import bad_request
from huatuo_local.runtime.serve.fields import unsupported

if TYPE_CHECKING:
    from huatuo_local.runtime.serve.request_images import ImageLoader

@dataclass
class ChatRequest:
    turns: list[Turn]
    images: list[ImageItem]
    params: SamplingParams
    seed: int | None
    stream: bool
    include_usage: bool
    model: str | None




def _number(body: dict, key: str, default, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise bad_request(f"'{key}' must be {'an integer' if integer else 'a number'}", key)
    return value


def sampling_from(body: dict) -> tuple[SamplingParams, int | None]:
    refused = unsupported(body)
    if refused is not None:
        raise bad_request(refused[1], refused[0])
    # The newer name wins when it holds a value; a null one (clients send it) leaves max_tokens in force.
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    # vLLM's extension min_tokens: at least this many new tokens (eos is masked until then); benchmarks
    # use it to make every answer the same length.
    fields = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
              "repetition_penalty": "repetition_penalty", "max_new_tokens": key, "min_new_tokens": "min_tokens",
              "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
              "logit_bias": "logit_bias", "top_logprobs": "top_logprobs"}
    params = SamplingParams(
        temperature=float(_number(body, "temperature", defaults.TEMPERATURE)),
        top_p=float(_number(body, "top_p", defaults.TOP_P)),
        top_k=int(_number(body, "top_k", defaults.TOP_K, integer=True)),
        repetition_penalty=float(_number(body, "repetition_penalty", defaults.REPETITION_PENALTY)),
        max_new_tokens=int(_number(body, key, defaults.MAX_NEW_TOKENS, integer=True)),
        min_new_tokens=int(_number(body, "min_tokens", defaults.MIN_NEW_TOKENS, integer=True)),
        presence_penalty=float(_number(body, "presence_penalty", 0.0)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0)),
        logit_bias=_logit_bias(body.get("logit_bias")),
        logprobs=_logprobs(body),
        grammar=grammar_from(body.get("response_format")),
    )
    try:
        params.check()
    except SettingError as exc:
        raise bad_request(f"'{fields[exc.setting]}' {exc.detail}", fields[exc.setting]) from None
    if params.min_new_tokens > params.max_new_tokens:
        raise bad_request(f"'min_tokens' must not exceed '{key}'", "min_tokens")
    params.min_new_tokens = max(defaults.MIN_NEW_TOKENS, params.min_new_tokens)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(1 << 63) <= seed < 1 << 64):
        raise bad_request("'seed' must be a 64-bit integer", "seed")
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
        raise bad_request("'stop' must be a string or a list of at most 4 strings", "stop")
    params.stop = tuple(s for s in stops if s)  # honoured by the scheduler (runtime/core/stops.py)
    return params, seed


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad_request("'logit_bias' must map token ids to biases from -100 to 100", "logit_bias")
    out = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit()) or isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise bad_request("'logit_bias' must map token ids (as strings of digits) to numbers", "logit_bias")
        out.append((int(key), float(bias)))
    return tuple(out)


def _logprobs(body: dict) -> int | None:
    """OpenAI's `logprobs` (true/false) and `top_logprobs` (0-20, only with logprobs) as one setting."""
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise bad_request("'logprobs' must be true or false", "logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
        raise bad_request("'top_logprobs' must be an integer from 0 to 20", "top_logprobs")
    if top is not None and not wanted:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def grammar_from(value) -> Grammar | None:
    """OpenAI's `response_format` as a constraint: None for text."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                          "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                          "response_format")
    try:
        if value["type"] == "text":
            return None
        if value["type"] == "json_object":
            return Grammar.json_object()
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise bad_request("'response_format.json_schema' needs a 'schema' object", "response_format")
        return Grammar.json_schema(spec["schema"])
    except SchemaError as exc:
        raise bad_request(f"response_format: {exc}", "response_format", code="invalid_schema") from None


def _text_and_parts(content, role: str, index: int) -> tuple[str, list[tuple[dict, str]]]:
    """A message's text and its image parts (not decoded yet), with where each is in the request."""
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return content, []
    if content is None and role == "assistant":
        return "", []
    if not isinstance(content, list):
        raise bad_request("content must be a string or a list of parts", where)
    texts, parts = [], []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad_request("each content part needs a 'type'", f"{where}[{j}]")
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request("a text part needs 'text'", f"{where}[{j}]")
            texts.append(part["text"])
        elif part["type"] == "image_url":
            if role != "user":
                raise bad_request("only user messages can hold images", f"{where}[{j}]")
            parts.append((part, f"{where}[{j}]"))
        else:
            raise bad_request(f"content part type {part['type'][:40]!r} is not supported (text, image_url)",
                       f"{where}[{j}]")
    return "\n".join(texts), parts


def parse_chat(body: object, loader: ImageLoader, cancelled: Callable[[], bool] | None = None) -> ChatRequest:
    """The request checked in full (structure, sampling, image count) before any image is decoded."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    params, seed = sampling_from(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    # (text, image parts, answer) per turn; system messages go before the next user message's text.
    turns: list[tuple[str, list[tuple[dict, str]], str | None]] = []
    system: list[str] = []
    pending: tuple[str, list[tuple[dict, str]]] | None = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise bad_request("each message needs a role: system, user or assistant", f"messages[{i}]")
        role = message["role"]
        text, parts = _text_and_parts(message.get("content"), role, i)
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            if pending is not None:
                raise bad_request("two user messages in a row; alternate user and assistant", f"messages[{i}]")
            if system:
                text = "\n\n".join([*system, text])
                system = []
            pending = (text, parts)
        else:
            if pending is None:
                raise bad_request("an assistant message must follow a user message", f"messages[{i}]")
            turns.append((*pending, text))
            pending = None
    if pending is None:
        raise bad_request("the last message must be from the user", "messages")
    turns.append((*pending, None))
    if sum(len(parts) for _, parts, _ in turns) > MAX_IMAGES:
        raise bad_request(f"at most {MAX_IMAGES} images per conversation (the release's limit)", "messages")
    images = [loader.load(part, where, cancelled) for _, parts, _ in turns for part, where in parts]
    model = body.get("model")
    return ChatRequest([Turn(text, len(parts), answer) for text, parts, answer in turns], images, params, seed,
                       stream, bool(options.get("include_usage")), model if isinstance(model, str) else None)
