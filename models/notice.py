"""What the tool is, said where users meet the model: the README, the chat's banner, the page, `--help`, every
answer's record."""

from __future__ import annotations

NOTICE = ("Research software, not a medical device: HuatuoGPT-Vision's answers may be wrong and are not a "
          "diagnosis; a qualified clinician decides.")
# The release's model cards (HuatuoGPT-Vision-7B and -34B on Hugging Face) have no limitations section of their
# own to quote; a model whose manifest carries one (`extra["limitations"]`) has it shown beside this notice.
