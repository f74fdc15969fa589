"""What a prompt is made of, for the scheduler: token ids and images (atomic, compared by content)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.prompt import Turn, render_segments
from PIL import Image


@dataclass(frozen=True)
class ImageItem:
    """An image's place in the token stream: compared by content hash, never re-encoded."""

    digest: str
    picture: Image.Image = field(compare=False, hash=False, repr=False)
    source: dict | None = field(default=None, compare=False, hash=False, repr=False)  # for records (record.py)


Item = int | ImageItem


def image_item(picture: Image.Image, source: dict | None = None) -> ImageItem:
    """`picture` (already at the tower's size) as a prompt item; `source` says where it came from."""
    return ImageItem(hashlib.sha256(picture.tobytes()).hexdigest(), picture, source)


def prompt_items(tokenize, segments: list[str], images: list[ImageItem]) -> list[Item]:
    """The release's input: each text segment tokenized on its own, an image between each two."""
    if len(segments) - 1 != len(images):
        raise HuatuoError("internal: image places and images disagree")
    items: list[Item] = []
    for i, segment in enumerate(segments):
        items.extend(tokenize(segment))
        if i < len(images):
            items.append(images[i])
    return items


def conversation_items(tokenize, turns: list[Turn], images: list[ImageItem]) -> list[Item]:
    return prompt_items(tokenize, render_segments(turns), images)
