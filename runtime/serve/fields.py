"""Every field of OpenAI's chat-completions request, and what this server does with it: the API's surface as
data. `serve/openai.py` refuses and ignores by this table, the README's table is checked against it
(tests/test_api_surface.py), and that test sends each field through the official client.

- supported: honoured as OpenAI documents it (with this model's limits where it has them);
- extension: not OpenAI's, honoured (as vLLM names them);
- ignored: accepted and without effect here, because it concerns OpenAI's service, not the answer;
- refused: a 400 naming the field, because honouring it silently wrong would mislead the program that sent it.
"""

from __future__ import annotations

SUPPORTED = "supported"
EXTENSION = "extension"
IGNORED = "ignored"
REFUSED = "refused"

# field -> (what we do, what a user should know). Refused fields are refused only when they ask for something
# (a non-default value): `n: 1`, `tool_choice: "none"` or `modalities: ["text"]` are fine.
FIELDS: dict[str, tuple[str, str]] = {
    "messages": (SUPPORTED, "user/assistant turns, system/developer text before the next user turn; images as "
                            "`image_url` parts (data: URIs; file:// only under --allow-files)"),
    "model": (SUPPORTED, "this server's model name (`GET /v1/models`); another name is a 404"),
    "max_tokens": (SUPPORTED, "new tokens at most (default 512, the release's)"),
    "max_completion_tokens": (SUPPORTED, "the same; wins over max_tokens"),
    "temperature": (SUPPORTED, "0 to 2; 0 is greedy (default 0.2, the release's)"),
    "top_p": (SUPPORTED, "above 0 to 1 (default 1)"),
    "seed": (SUPPORTED, "the same seed and request give the same answer"),
    "stop": (SUPPORTED, "up to 4 strings; the answer ends before the first; not counted in usage"),
    "stream": (SUPPORTED, "server-sent events, as OpenAI's"),
    "stream_options": (SUPPORTED, "`include_usage`"),
    "response_format": (SUPPORTED, "`text`, `json_object`, `json_schema` enforced while sampling; a schema the "
                                   "engine cannot enforce is a 400 naming the construct"),
    "logprobs": (SUPPORTED, "each answer token's log-probability, from the model's own distribution (before the "
                            "repetition penalty, temperature, top-k/top-p and any schema)"),
    "top_logprobs": (SUPPORTED, "0 to 20 alternatives per token; needs logprobs"),
    "logit_bias": (SUPPORTED, "token id -> -100 to 100, added to the scores before sampling"),
    "presence_penalty": (SUPPORTED, "-2 to 2, OpenAI's additive penalty (default 0; the release uses "
                                    "repetition_penalty)"),
    "frequency_penalty": (SUPPORTED, "-2 to 2, likewise"),
    "n": (REFUSED, "1 only: one answer per request (send n requests; they share the prompt's cached state)"),
    "top_k": (EXTENSION, "0 (off) or more (default 50, the release's)"),
    "repetition_penalty": (EXTENSION, "0.01 to 10 (default 1.2, the release's)"),
    "min_tokens": (EXTENSION, "at least this many new tokens (the end is masked until then)"),
    "tools": (REFUSED, "this model was not trained to call tools"),
    "tool_choice": (REFUSED, "the same (\"none\" is accepted)"),
    "functions": (REFUSED, "the same (OpenAI's older name)"),
    "function_call": (REFUSED, "the same (\"none\" is accepted)"),
    "parallel_tool_calls": (IGNORED, "there are no tools"),
    "audio": (REFUSED, "text answers only"),
    "modalities": (REFUSED, "text answers only ([\"text\"] is accepted)"),
    "prediction": (REFUSED, "no predicted outputs"),
    "web_search_options": (REFUSED, "the server never reaches the network"),
    "reasoning_effort": (REFUSED, "not a reasoning model"),
    "verbosity": (REFUSED, "no such control in this model"),
    "moderation": (IGNORED, "OpenAI's service setting"),
    "metadata": (IGNORED, "OpenAI's stored-completions setting; nothing is stored"),
    "store": (IGNORED, "nothing is stored"),
    "service_tier": (IGNORED, "OpenAI's service setting"),
    "user": (IGNORED, "OpenAI's abuse-monitoring id; tenants come from API keys (--api-key-file)"),
    "safety_identifier": (IGNORED, "the same"),
    "prompt_cache_key": (IGNORED, "reuse is automatic, within each API key's tenant"),
    "prompt_cache_options": (IGNORED, "the same"),
    "prompt_cache_retention": (IGNORED, "the same"),
}

# The values of a refused field that ask for nothing (clients send them by default).
HARMLESS = {"n": (1,), "tool_choice": ("none",), "function_call": ("none",), "modalities": (["text"],),
            "tools": ([],), "functions": ([],), "parallel_tool_calls": (True, False)}


def unsupported(body: dict) -> tuple[str, str] | None:
    """The first field of `body` this server refuses or does not know, and why; None when all are fine."""
    for key, value in body.items():
        entry = FIELDS.get(key)
        if entry is None:
            return key, f"unrecognized request argument '{key}' (the fields this server takes: see its README)"
        if entry[0] == REFUSED and value is not None and value not in HARMLESS.get(key, ()):
            return key, f"'{key}' is not supported: {entry[1]}"
    return None
