#!/usr/bin/env python3
"""Apply huatuo-local's one-line fix to llama.cpp's LLaVA vision graph.

llama.cpp's `tools/mtmd/models/llava.cpp` appends the CLIP class token *after* the
patch embeddings while the position ids and the rows it selects later assume it comes
first (upstream ggml-org/llama.cpp#25814). Every patch then gets its neighbour's
position embedding and the class token reaches the LLM as an image token. Swapping the
two operands of that `ggml_concat` restores CLIP's order.

Exit codes: 0 fixed now or already fixed, 2 the upstream line changed (the fix must be
re-examined by hand, never guessed). Usage: fix_llava_concat.py LLAMA_CPP_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

RELATIVE_PATH = Path("tools/mtmd/models/llava.cpp")
BUGGY = "inp = ggml_concat(ctx0, inp, model.class_embedding, 1);"
FIXED = "inp = ggml_concat(ctx0, model.class_embedding, inp, 1);"
# Part of the wheel-cache key: bump when the fix itself changes.
FIX_ID = "llava-cls-first-v1"


class FixError(RuntimeError):
    pass


def apply_fix(llama_cpp_dir: Path) -> str:
    """Fix the file in place; return "applied" or "already-fixed"; raise FixError otherwise."""
    path = Path(llama_cpp_dir) / RELATIVE_PATH
    if not path.is_file():
        raise FixError(f"{path}: not found; the llama.cpp layout changed, re-examine the LLaVA fix by hand")
    text = path.read_text(encoding="utf-8")
    n_buggy, n_fixed = text.count(BUGGY), text.count(FIXED)
    if n_buggy == 1 and n_fixed == 0:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text.replace(BUGGY, FIXED), encoding="utf-8")
        tmp.replace(path)
        return "applied"
    if n_buggy == 0 and n_fixed == 1:
        return "already-fixed"
    raise FixError(
        f"{path}: the class-token concat line changed upstream "
        f"(found {n_buggy} buggy and {n_fixed} fixed copies); re-examine the LLaVA fix by hand"
    )


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    try:
        outcome = apply_fix(Path(argv[1]))
    except FixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if outcome == "applied":
        print(f"fix_llava_concat: applied to {Path(argv[1]) / RELATIVE_PATH}")
    else:
        print("fix_llava_concat: upstream already puts the class token first; nothing applied")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
