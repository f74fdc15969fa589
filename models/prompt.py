"""The HuatuoGPT-Vision prompt: input cleaning, turn rendering, and the GGUF chat template.

Both the Python renderer and the Jinja template live here so that they cannot drift; a
test renders the template and compares it with `render_prompt` on the same conversation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IMAGE_TOKEN = "<image>"  # what the release writes where an image goes
MEDIA_MARKER = "<__media__>"  # libmtmd's default marker
USER_TAG = "<|user|>\n"
ASSISTANT_TAG = "<|assistant|>\n"
_REMOVED = ("<image>", "<s>", "</s>")
MAX_IMAGES = 6


@dataclass(frozen=True)
class Turn:
    """One exchange; `answer` is None for the turn being asked."""

    text: str
    n_images: int = 0
    answer: str | None = None


def clean_user_text(text: str) -> str:
    """What the release does to user text before it is used: drop image and s-tags, strip."""
    for s in _REMOVED:
        text = text.replace(s, "")
    return text.strip()


def render_turn(text: str, n_images: int, marker: str = IMAGE_TOKEN) -> str:
    return USER_TAG + f"{marker}\n" * n_images + clean_user_text(text) + "\n" + ASSISTANT_TAG


def render_prompt(turns: Sequence[Turn], marker: str = IMAGE_TOKEN) -> str:
    """The whole prompt; every turn but the last has its answer followed by ' \\n'."""
    out = []
    for turn in turns:
        out.append(render_turn(turn.text, turn.n_images, marker))
        if turn.answer is not None:
            out.append(turn.answer + " \n")
    return "".join(out)


def render_segments(turns: Sequence[Turn]) -> list[str]:
    """The prompt as the text between its images: `IMAGE_TOKEN.join(render_segments(t)) == render_prompt(t)`.

    The release splits its rendered prompt at every `<image>` and tokenizes each piece on its own.
    Building the pieces directly gives the same pieces, and text that happens to contain `<image>`
    (a question, or an answer sent back as history) stays text instead of becoming a placeholder.
    """
    segments = [""]
    for turn in turns:
        segments[-1] += USER_TAG
        for _ in range(turn.n_images):
            segments.append("\n")
        segments[-1] += clean_user_text(turn.text) + "\n" + ASSISTANT_TAG
        if turn.answer is not None:
            segments[-1] += turn.answer + " \n"
    return segments


def segments_before_question(turns: Sequence[Turn], n_images: int = 0) -> list[str]:
    """The segments of the next turn up to where its question's text begins (its images come first)."""
    segments = render_segments([*turns, Turn("", n_images)])
    tail = "\n" + ASSISTANT_TAG  # what an empty question leaves after the images
    segments[-1] = segments[-1][: -len(tail)]
    return segments


# Written into the GGUF as tokenizer.chat_template. Content may be a string or a list of
# parts ({"type": "text"} / {"type": "image"} or "image_url"); a turn's images go first.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set ns = namespace(text='', images=0) -%}"
    "{%- if message['content'] is string -%}"
    "{%- set ns.text = message['content'] -%}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}"
    "{%- set ns.text = ns.text + part['text'] -%}"
    "{%- elif part['type'] == 'image' or part['type'] == 'image_url' -%}"
    "{%- set ns.images = ns.images + 1 -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|user|>\\n' -}}"
    "{%- for i in range(ns.images) -%}{{- '" + MEDIA_MARKER + "\\n' -}}{%- endfor -%}"
    "{{- ns.text.replace('<image>', '').replace('<s>', '').replace('</s>', '').strip() -}}"
    "{{- '\\n<|assistant|>\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- message['content'] + ' \\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
