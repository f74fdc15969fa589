"""Issue 35: the API's surface written down and checked. Every field of OpenAI's chat-completions request is in
runtime/serve/fields.py and in the README's table with the same verdict, and each is sent through the official
client: supported, extension and ignored fields are answered; refused ones are a 400 naming the field."""

from __future__ import annotations

import inspect
import re

import numpy as np
import openai
import pytest
from conftest import ROOT
from PIL import Image
from test_serve import client, data_uri, server, user
from tiny_models import TinySpec

# A value asking for something, for each field (the client's own parameters, then the extensions).
SAMPLES = {
    "model": "tiny", "max_tokens": 3, "max_completion_tokens": 3, "temperature": 0.5, "top_p": 0.9, "seed": 3,
    "stop": ["\n\n"], "stream": False, "stream_options": None, "response_format": {"type": "json_object"},
    "logprobs": True, "top_logprobs": None, "logit_bias": {"5": -100}, "presence_penalty": 0.5,
    "frequency_penalty": 0.5, "n": 2, "top_k": 10, "repetition_penalty": 1.1, "min_tokens": 2,
    "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
    "tool_choice": "required", "functions": [{"name": "lookup", "parameters": {"type": "object"}}],
    "function_call": "auto", "parallel_tool_calls": False, "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
    "web_search_options": {}, "reasoning_effort": "low", "verbosity": "low", "moderation": None,
    "metadata": {"study": "x"}, "store": True, "service_tier": "auto", "user": "u1", "safety_identifier": "s1",
    "prompt_cache_key": "k", "prompt_cache_options": None, "prompt_cache_retention": None,
}
EXTRA = {"top_k", "repetition_penalty", "min_tokens"}  # not the client's parameters: sent in extra_body
NOT_FIELDS = {"messages", "extra_headers", "extra_query", "extra_body", "timeout"}


def table() -> dict[str, str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z_]+)` \| (supported|extension|ignored|refused) \|",
                                                       text, re.M)}


def test_the_readme_table_is_the_servers_table_and_covers_the_clients_fields():
    from huatuo_local.runtime.serve.fields import FIELDS
    from openai.resources.chat.completions import Completions

    assert table() == {k: v[0] for k, v in FIELDS.items()}
    client_fields = set(inspect.signature(Completions.create).parameters) - {"self"} - {"extra_headers", "extra_query",
                                                                                         "extra_body", "timeout"}
    assert client_fields - set(FIELDS) == set(), "a field of the official client this server does not account for"
    assert set(SAMPLES) | {"messages"} == set(FIELDS)


def test_each_field_through_the_official_client(converted, tmp_path):
    from huatuo_local.runtime.serve.fields import FIELDS, REFUSED

    model = converted(TinySpec(arch="qwen2", seed=32, tower="folder"), "F32", "f32")
    scan = tmp_path / "scan.png"
    Image.fromarray((np.random.default_rng(2).random((40, 40, 3)) * 255).astype(np.uint8)).save(scan)
    with server(str(model.manifest_path), tmp_path, "--no-prefix-cache") as (url, _, _):
        c = client(url)
        messages = [user("What is shown?", data_uri(scan))]
        answered, refused = [], []
        for field, value in SAMPLES.items():
            if value is None:  # fields only meaningful beside another (stream_options, top_logprobs) or unset
                value = {"stream_options": {"include_usage": True}, "top_logprobs": 2}.get(field)
            extra = {"stream": True} if field == "stream_options" else {}
            extra |= {"logprobs": True} if field == "top_logprobs" else {}
            kwargs = {"extra_body": {field: value}} if field in EXTRA else {field: value}
            if field in ("moderation", "prompt_cache_options", "prompt_cache_retention"):
                kwargs = {"extra_body": {field: {"x": 1} if field != "prompt_cache_retention" else "24h"}}
            call = dict(model="tiny", messages=messages, max_tokens=3, **extra)
            call.update(kwargs)
            if FIELDS[field][0] == REFUSED:
                with pytest.raises(openai.BadRequestError) as err:
                    c.chat.completions.create(**call)
                assert err.value.body["param"] == field and "not supported" in err.value.body["message"], field
                refused.append(field)
            else:
                out = c.chat.completions.create(**call)
                if call.get("stream"):
                    out = list(out)
                    assert out and out[-1].usage is not None, field
                else:
                    assert out.choices[0].finish_reason in ("stop", "length"), field
                answered.append(field)
        assert len(answered) + len(refused) == len(SAMPLES)
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="tiny", messages=messages, max_tokens=2, extra_body={"frobnicate": 1})
        assert err.value.body["param"] == "frobnicate" and "unrecognized" in err.value.body["message"]
        # What clients send by default for refused fields asks for nothing and is accepted.
        ok = c.chat.completions.create(model="tiny", messages=messages, max_tokens=2, n=1, tool_choice="none",
                                       modalities=["text"])
        assert ok.choices[0].message.content is not None
