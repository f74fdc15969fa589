"""Issue 35: structured answers and log-probabilities, through the official OpenAI client, the CLI and the
Python API.

The models are tiny and random: their free text is gibberish, so an answer that parses and validates does so
because the schema was enforced while sampling, not because the model knew JSON."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import numpy as np
import openai
import pytest
from conftest import run_cli
from PIL import Image
from pydantic import BaseModel, Field
from test_serve import client, data_uri, server, user
from tiny_models import TinySpec

SPEC = TinySpec(arch="qwen2", seed=31, tower="folder")

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "finding": {"type": "object", "properties": {
            "organ": {"type": "string", "maxLength": 12},
            "size_mm": {"type": "integer", "minimum": 1, "maximum": 90}},
            "required": ["organ", "size_mm"], "additionalProperties": False},
        "normal": {"type": "boolean"}}, "required": ["finding", "normal"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {
        "modality": {"enum": ["CT", "MR", "X-ray", "ultrasound"]},
        "side": {"type": "string", "enum": ["left", "right", "both", "none"]}},
        "required": ["modality", "side"], "additionalProperties": False},
    "integer range": {"type": "object", "properties": {
        "score": {"type": "integer", "minimum": 0, "maximum": 500},
        "delta": {"type": "integer", "minimum": -20, "maximum": -3}},
        "required": ["score", "delta"], "additionalProperties": False},
    "bounded string": {"type": "object", "properties": {
        "impression": {"type": "string", "minLength": 3, "maxLength": 25},
        "code": {"type": "string", "pattern": "^[A-Z][0-9]{2}(\\.[0-9])?$"}},
        "required": ["impression", "code"], "additionalProperties": False},
    "array": {"type": "object", "properties": {
        "lesions": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "properties": {
            "label": {"enum": ["nodule", "mass", "cyst"]},
            "diameter": {"type": "integer", "minimum": 2, "maximum": 40}},
            "required": ["label", "diameter"], "additionalProperties": False}}},
        "required": ["lesions"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("structured") / "scan.png"
    Image.fromarray((np.random.default_rng(9).random((48, 64, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def served(converted, scan, tmp_path_factory):
    model = converted(SPEC, "F32", "f32")
    with server(str(model.manifest_path), tmp_path_factory.mktemp("serve"), "--no-prefix-cache") as (url, _, _):
        yield model, client(url), [user("Report the findings.", data_uri(scan))]


def test_every_answer_parses_and_validates_against_five_schemas(served):
    """5 schemas x (greedy, and sampled with 3 seeds at temperature 1): 20 answers, every one valid."""
    _, c, messages = served
    answers = 0
    for name, schema in SCHEMAS.items():
        for seed in (None, 1, 2, 3):
            r = c.chat.completions.create(
                model="tiny", messages=messages, max_tokens=300, temperature=0 if seed is None else 1.0, seed=seed,
                response_format={"type": "json_schema", "json_schema": {"name": name.replace(" ", "_"),
                                                                        "schema": schema}})
            text = r.choices[0].message.content
            assert r.choices[0].finish_reason == "stop", (name, text)
            jsonschema.validate(json.loads(text), schema)
            answers += 1
    assert answers == 20


def test_free_text_is_gibberish_and_unchanged_by_the_new_fields(served, scan):
    """Without a schema the answer is not JSON (the model knows none); `text` format and logprobs change
    nothing, and the server's greedy answer is chat's."""
    model, c, messages = served
    plain = c.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    text = plain.choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(text)
    same = c.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                     response_format={"type": "text"}, logprobs=True, top_logprobs=3)
    assert same.choices[0].message.content == text
    proc = run_cli("chat", str(scan), "-p", "Report the findings.", "--json", "--temperature", "0",
                   "--max-tokens", "24", "--no-prefix-cache", "--model", str(model.manifest_path))
    assert json.loads(proc.stdout)["answer"] == text


def test_json_object_streaming_and_pydantic_parse(served):
    _, c, messages = served
    for seed in (4, 5, 6):  # any JSON object (the empty one included)
        r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=200, temperature=0.8, seed=seed,
                                      response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = SCHEMAS["nested"]
    stream = c.chat.completions.create(model="tiny", messages=messages, max_tokens=200, temperature=0.8, seed=4,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "nested", "schema": schema}},
                                       stream=True)
    pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert len([p for p in pieces if p]) > 5  # it streamed
    jsonschema.validate(json.loads("".join(pieces)), schema)

    class Finding(BaseModel):
        organ: Literal["lung", "liver", "heart"]
        size_mm: int = Field(ge=1, le=60)
        note: str = Field(max_length=20)

    parsed = c.chat.completions.parse(model="tiny", messages=messages, response_format=Finding, max_tokens=200,
                                      temperature=1.0, seed=7)
    finding = parsed.choices[0].message.parsed
    assert isinstance(finding, Finding) and 1 <= finding.size_mm <= 60


def test_schemas_the_engine_cannot_enforce_are_a_400_naming_the_construct(served, scan, tmp_path):
    model, c, messages = served
    lookbehind = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}
    for fmt, said in (
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": lookbehind}}, "look-behind"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "/nowhere"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs a 'schema'"),
        ({"type": "xml"}, "'response_format' must be"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, response_format=fmt)
        assert said in err.value.body["message"] and err.value.body["param"] == "response_format", err.value.body
    schema = tmp_path / "bad.json"
    schema.write_text(json.dumps(lookbehind))
    proc = run_cli("chat", str(scan), "-p", "x", "--json-schema", str(schema), "--model", str(model.manifest_path))
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: --json-schema {schema}: ")
    assert "look-behind" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_chat_json_schema_and_the_python_api(converted, scan, tmp_path):
    from huatuo_local import HuatuoChatbot

    model = converted(SPEC, "F32", "f32")
    schema = SCHEMAS["array"]
    path = tmp_path / "lesions.schema.json"
    path.write_text(json.dumps(schema))
    proc = run_cli("chat", str(scan), "-p", "List the lesions.", "--json-schema", str(path), "--temperature", "0.9",
                   "--seed", "5", "--max-tokens", "300", "--no-prefix-cache", "--model", str(model.manifest_path))
    assert proc.returncode == 0, proc.stderr
    jsonschema.validate(json.loads(proc.stdout), schema)

    class Lesion(BaseModel):
        label: Literal["nodule", "mass", "cyst"]
        diameter: int = Field(ge=2, le=40)

    with HuatuoChatbot(model.manifest_path, temperature=0, max_new_tokens=200, prefix_cache=False) as bot:
        free = bot.inference("List the lesions.", [scan])[0]
        shaped = bot.inference("List the lesions.", [scan], schema=Lesion)[0]
        assert Lesion.model_validate_json(shaped)
        assert bot.inference("List the lesions.", [scan])[0] == free  # the schema was for that call only
        jsonschema.validate(json.loads(bot.chat("And now?", [scan], schema=schema)), schema)


def test_logprobs_are_the_models_own_distribution(served, converted, scan):
    """Greedy with no penalty: each chosen token is the model's most likely one, so its log-probability is the
    first alternative's; the alternatives are ordered; streaming gives one entry per token; and the first
    token's value is the log-softmax of the logits llama.cpp computes for the prompt, worked out here."""
    model, c, messages = served
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, logprobs=True,
                                  top_logprobs=5, extra_body={"repetition_penalty": 1.0})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 12
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True) and sum(np.exp(tops)) <= 1 + 1e-6
        assert entry.logprob == pytest.approx(tops[0]) and entry.token == entry.top_logprobs[0].token
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert "".join(e.token for e in content).strip() == r.choices[0].message.content
    stream = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, logprobs=True,
                                       stream=True, extra_body={"repetition_penalty": 1.0})
    streamed = [e for ch in stream if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=messages, max_tokens=2, top_logprobs=3)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=messages, max_tokens=2, logprobs=True, top_logprobs=21)

    from huatuo_local.runtime.core.sampling import SamplingParams

    from huatuo_local import HuatuoChatbot

    with HuatuoChatbot(model.manifest_path, temperature=0, prefix_cache=False) as bot:
        session = bot.session
        items = session.items_for([*session.turns, _turn("Report the findings.")], session.prepare_images([scan]))
        logits = session.evaluate(items).astype(np.float64)
        want = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        reply = session.ask("Report the findings.", [scan], SamplingParams(temperature=0, max_new_tokens=1,
                                                                          repetition_penalty=1.0, logprobs=3))
        first = reply.logprobs[0]
        assert first.token == int(np.argmax(want)) and first.logprob == pytest.approx(want[first.token], abs=1e-4)


def _turn(text: str):
    from huatuo_local.models.prompt import Turn

    return Turn(text, 1)
