"""Tokenization on the real Qwen2 vocabulary: HF tokenizers and our llama.cpp path agree."""

from __future__ import annotations

from pathlib import Path

import pytest
from huatuo_local.models.prompt import Turn, render_prompt
from tiny_models import TinySpec

TEXT = (Path(__file__).parent / "data" / "medical_text.txt").read_text(encoding="utf-8")

EDGE_CASES = [
    "12345678901234567890 3.14159 1,000,000 10^9/L -2.8 +5",
    "emoji 😀🩺💊🫁 and flags 🇨🇳🇺🇸 and ZWJ 👩‍⚕️",
    "CRLF line\r\nnext line\r\n\r\nend\r",
    "long whitespace" + " " * 33 + "run" + "\t" * 7 + "tabs" + "\n" * 6 + "newlines",
    " " * 40,
    "e\u0301 café (decomposed) vs café (composed)",
    "don't it's we're they've I'm you'll he'd DON'T",
    "</s> is plain text; <s> too; <|im_end|> and <|endoftext|> are special",
    "<|user|>\n<|assistant|>\n",
    "mixed中英文text混排123",
    "",
]


@pytest.fixture(scope="module")
def qwen(tiny, converted, tmp_path_factory):
    import qwen_vocab
    from huatuo_local.runtime.engine.engine import Engine, EngineOptions
    from transformers import AutoTokenizer

    tok_dir = qwen_vocab.build(tmp_path_factory.mktemp("qwen-tokenizer"))
    spec = TinySpec(arch="qwen2", hidden=16, heads=2, kv_heads=1, ffn=32, vocab_size=152064,
                    tokenizer_from=str(tok_dir))
    result = converted(spec, "F16", "f16")
    engine = Engine(result.llm_path, result.mmproj_path, EngineOptions(n_ctx=512))
    hf = AutoTokenizer.from_pretrained(str(tiny(spec)["ckpt"]))
    yield engine, hf
    engine.close()


def hf_ids(hf, text: str) -> list[int]:
    return hf(text, add_special_tokens=False).input_ids


def test_real_vocabulary_medical_text_line_by_line(qwen):
    engine, hf = qwen
    lines = TEXT.splitlines()
    assert len(TEXT.encode()) >= 10_000
    mismatches = [ln for ln in lines if engine.tokenizer.tokenize(ln) != hf_ids(hf, ln)]
    assert not mismatches, mismatches[:3]


def test_real_vocabulary_whole_text_and_prompt_format(qwen):
    engine, hf = qwen
    assert engine.tokenizer.tokenize(TEXT) == hf_ids(hf, TEXT)
    prompt = render_prompt([Turn("What does the CT show?", 1, "A liver lesion."), Turn("胸片有异常吗？", 0)])
    for chunk in prompt.split("<image>"):
        assert engine.tokenizer.tokenize(chunk) == hf_ids(hf, chunk)


@pytest.mark.parametrize("text", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_real_vocabulary_edge_cases(text, qwen):
    engine, hf = qwen
    ids = engine.tokenizer.tokenize(text)
    assert ids == hf_ids(hf, text)
    assert engine.tokenizer.detokenize(ids) == hf.decode(ids, skip_special_tokens=True)


def test_eos_is_the_checkpoint_eos_and_plain_s_tags_stay_text(qwen):
    engine, hf = qwen
    assert engine.eos_id == 151643
    ids = engine.tokenizer.tokenize("</s>")
    assert ids == hf_ids(hf, "</s>") and len(ids) > 1
    assert engine.tokenizer.tokenize("<|im_end|>") == [151645]


def test_long_tokens_detokenize_whole(qwen):
    """A 33-space token is longer than llama-cpp-python's 32-byte piece buffer."""
    engine, hf = qwen
    for n in (31, 33, 64, 80):
        ids = engine.tokenizer.tokenize(" " * n + "x")
        assert engine.tokenizer.detokenize(ids) == " " * n + "x"


def test_prompt_segments_are_the_releases_split_and_keep_placeholder_text_as_text():
    from huatuo_local.models.prompt import IMAGE_TOKEN, render_segments, segments_before_question
    from hypothesis import given, settings
    from hypothesis import strategies as st

    text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)

    @settings(max_examples=300, derandomize=True, deadline=None)
    @given(st.lists(st.tuples(text, st.integers(0, 3), st.one_of(st.none(), text)), min_size=1, max_size=4))
    def check(raw):
        turns = [Turn(t, n, a) for t, n, a in raw[:-1] if a is not None] + [Turn(raw[-1][0], raw[-1][1])]
        rendered = render_prompt(turns)
        segments = render_segments(turns)
        assert IMAGE_TOKEN.join(segments) == rendered
        assert len(segments) == 1 + sum(t.n_images for t in turns)
        if IMAGE_TOKEN not in "".join(t.text + (t.answer or "") for t in turns):
            assert segments == rendered.split(IMAGE_TOKEN)  # exactly the release's pieces
        before = segments_before_question(turns[:-1], turns[-1].n_images)
        assert IMAGE_TOKEN.join(before) == render_prompt(turns)[: len(IMAGE_TOKEN.join(before))]

    check()
    # A question or an earlier answer holding the placeholder's text: text, never an image place.
    turns = [Turn("see", 1, "it says <image> here"), Turn("what is <ima<s>ge>?", 1)]
    assert len(render_segments(turns)) == 3
    assert "<image>" in render_segments(turns)[1] and "<image>" in render_segments(turns)[2]
