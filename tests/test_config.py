"""Issue 31: one model configuration for every front-end, and stop strings honoured by the scheduler.

Every command that loads a model accepts every load option (ModelConfig's fields, runtime/core/config.py),
and the same options reach the engine the same way whichever front-end loads the model: the command line
(chat, serve, eval, verify), the Python API and the server. Stop strings end the answer in the scheduler,
so chat, the API and the server cut at the same place and count the same tokens."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
from conftest import run_cli
from tiny_models import TinySpec

SPEC = TinySpec(arch="qwen2", seed=8, tower="folder")
# verify measures with its own context, KV type and sequence count, on this machine alone (runtime/cli/tools.py)
VERIFY_SETS = {"model", "ctx", "kv_type", "parallel", "prefix_cache", "rpc", "rpc_key_file", "tensor_split"}


def flags() -> dict[str, tuple[str, ...]]:
    from huatuo_local.runtime.core.config import ModelConfig, flag_of

    return {f.name: flag_of(f).names for f in fields(ModelConfig) if flag_of(f) is not None}


@pytest.mark.parametrize("command", ["chat", "serve", "eval", "verify"])
def test_every_command_that_loads_a_model_takes_every_load_option(command):
    shown = run_cli(command, "--help").stdout
    unused = {"chat": {"parallel"}, "verify": VERIFY_SETS}.get(command, set())  # one conversation; see above
    for name, names in flags().items():
        for flag in names:
            if name in unused:
                assert f"{flag} " not in shown, (command, flag)
            else:
                assert f"{flag} " in shown or f"{flag}," in shown, (command, flag)


GIVEN = ["--ctx", "1024", "--threads", "1", "--kv-type", "f32", "--no-mmproj-offload", "--allow-unverified-vision",
         "--no-prefix-cache", "-ngl", "0"]


def test_the_same_options_reach_the_engine_alike_from_every_front_end(monkeypatch, tmp_path, converted):
    """The command line of chat, serve and eval, and the Python API, given the same options, load the model with
    the same ModelConfig, hence the same engine options."""
    import importlib

    from huatuo_local.runtime import api
    from huatuo_local.runtime.core import loading
    from huatuo_local.runtime.serve import server
    from typer.testing import CliRunner

    model = str(converted(SPEC, "F32", "f32").manifest_path)
    seen: dict[str, object] = {}

    class Loaded(Exception):
        pass

    def record(name):
        def stand_in(config, **_):  # prefetch: the first pictures, not a load option
            seen[name] = config
            raise Loaded
        return stand_in

    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (20, 20)).save(image)
    app = importlib.import_module("huatuo_local.runtime.cli.app")
    runner = CliRunner()
    monkeypatch.setattr(api, "open_model", record("chat"))
    out = runner.invoke(app.app, ["chat", str(image), "-p", "hi", "--model", model, *GIVEN])
    assert isinstance(out.exception, Loaded), out.output
    monkeypatch.setattr(server, "serve", lambda config, open_browser=False: seen.__setitem__("serve", config.model))
    out = runner.invoke(app.app, ["serve", "--model", model, "--parallel", "1", *GIVEN])
    assert out.exit_code == 0, out.output
    from huatuo_local.runtime.eval import worker

    monkeypatch.setattr(loading, "open_model", record("eval"))
    monkeypatch.setattr(worker, "EvalWorker", lambda config, settings: record("eval")(config))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"question": "Which?", "options": ["a", "b"], "answer": "a", "image": ["x.png"],
                                 "dataset": "VQA-RAD"}]))
    runner.invoke(app.app, ["eval", str(data), "--model", model, "--out", str(tmp_path / "run"), *GIVEN])
    assert "eval" in seen
    monkeypatch.setattr(api, "open_model", record("api"))
    with pytest.raises(Loaded):
        api.HuatuoChatbot(model, ctx=1024, threads=1, kv_type="f32", mmproj_offload=False,
                          allow_unverified_vision=True, prefix_cache=False, n_gpu_layers=0)
    configs = {name: seen[name] for name in ("chat", "serve", "eval", "api")}
    # eval loads the model by its manifest's path (a store name resolves once, for every worker): the same file.
    configs["eval"] = configs["eval"].with_(model=model)
    assert len(set(configs.values())) == 1, configs
    config = configs["chat"]
    assert (config.ctx, config.threads, config.kv_type, config.mmproj_offload, config.allow_unverified_vision,
            config.prefix_cache, config.n_gpu_layers) == (1024, 1, "f32", False, True, False, 0)
    options = loading.engine_options(config, 0, config.mmproj_offload)
    assert (options.n_ctx, options.n_threads, options.kv_type, options.mmproj_offload, options.n_seq) == (
        1024, 1, "f32", False, 1)


def test_a_bad_load_option_is_one_line_naming_its_flag():
    for args, said in ((["--ctx", "5"], "--ctx 5: give 64 to 1048576"),
                       (["--kv-type", "q2"], "--kv-type q2: choose f16, f32 or q8_0"),
                       (["--tensor-split", "1,1"], "--tensor-split needs --rpc"),
                       (["--rpc-key-file", "k"], "--rpc-key-file needs --rpc")):
        for command in ("chat", "serve", "eval"):
            extra = ["data.json"] if command == "eval" else []
            proc = run_cli(command, *extra, *args)
            assert proc.returncode == 1 and proc.stderr.strip() == f"error: {said}", (command, proc.stderr)


def test_stop_strings_end_the_answer_alike_in_chat_the_api_and_the_server(converted, tmp_path):
    """The answer ends before the first stop string; nothing after it is generated or counted."""
    import numpy as np
    import openai
    from PIL import Image
    from test_serve import client, data_uri, server, user

    from huatuo_local import HuatuoChatbot

    model = converted(SPEC, "F32", "f32")
    image = tmp_path / "scan.png"
    Image.fromarray((np.random.default_rng(4).random((60, 80, 3)) * 255).astype(np.uint8)).save(image)
    question = "What does the picture show?"

    def chat(*extra):
        proc = run_cli("chat", str(image), "-p", question, "--json", "--temperature", "0", "--max-tokens", "24",
                       "--no-prefix-cache", "--model", str(model.manifest_path), *extra)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    full = chat()
    text = full["answer"]
    assert len(text) > 12 and full["tokens"]["generated"] == 24, full
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = chat("--stop", stop)
    want = text[: text.index(stop)].strip()
    assert cut["answer"] == want and cut["finish_reason"] == "stop", (cut, stop)
    assert cut["tokens"]["generated"] < full["tokens"]["generated"]
    with HuatuoChatbot(model.manifest_path, temperature=0, max_new_tokens=24, prefix_cache=False,
                       stop=[stop]) as bot:
        assert bot.chat(question, [image]) == want
        assert len(bot.last_reply.tokens) == cut["tokens"]["generated"]
    with server(str(model.manifest_path), tmp_path, "--no-prefix-cache") as (url, _, _):
        c = client(url)
        messages = [user(question, data_uri(image))]
        r = c.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=24, stop=[stop])
        assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == cut["tokens"]["generated"]  # what was returned, not more
        stream = c.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=24,
                                           stop=stop, stream=True, stream_options={"include_usage": True})
        pieces, usage, reason = [], None, None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                reason = choice.finish_reason or reason
        assert "".join(pieces) == want and reason == "stop" and usage.completion_tokens == r.usage.completion_tokens
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, stop=["a", "b", "c", "d", "e"])
