"""How weights reach memory (issue 16, item 5): each load mode does what it says, and answers are the same.

A load option that llama.cpp never sees (the engine once set a `use_mmap` attribute the binding's
struct does not have) would pass every answer test; these look at the process's mappings instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT
from tiny_models import TinySpec

CHILD = textwrap.dedent("""
    import json, os, sys
    from huatuo_local.runtime.engine.engine import Engine, EngineOptions
    llm, mmproj, load = sys.argv[1], sys.argv[2], sys.argv[3] or None

    def mapped_rss():
        path, rss, seen, current = os.path.realpath(llm), 0, False, False
        for line in open("/proc/self/smaps"):
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                current = len(head) == 6 and head[5] == path
                seen = seen or current
            elif current and head[0] == "Rss:":
                rss += int(head[1]) * 1024
        return seen, rss

    eng = Engine(llm, mmproj, EngineOptions(n_ctx=512, load=load))
    seen, rss = mapped_rss()
    toks = eng.tokenizer.tokenize("The chest radiograph shows")
    pos, out = 0, []
    for _ in range(6):
        eng.decode_tokens([(0, t, pos + i, i == len(toks) - 1) for i, t in enumerate(toks)])
        pos += len(toks)
        nxt = int(eng.logits_at(len(toks) - 1).argmax())
        out.append(nxt)
        toks = [nxt]
    print(json.dumps({"mapped": seen, "rss": rss, "size": os.path.getsize(llm), "tokens": out}))
""")


def load(model, mode: str | None) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model.llm_path), str(model.mmproj_path), mode or ""],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def repacked(converted):
    # Q4_K_M at widths llama.cpp's CPU backend repacks (rows of 256, 8-row tiles)
    return converted(TinySpec(seed=21, hidden=1024, layers=2, heads=8, kv_heads=4, ffn=4096, tower="folder"),
                     "Q4_K_M", "f32")


def test_load_modes_map_read_and_release_as_named(repacked):
    read, mapped, default = load(repacked, "read"), load(repacked, "mmap"), load(repacked, None)
    assert not read["mapped"]  # read into llama.cpp's buffers: no mapping left
    assert mapped["mapped"] and mapped["rss"] > 0.5 * mapped["size"]  # mapped and resident beside the copy
    # The default maps, and drops the pages llama.cpp copied into its repacked buffers.
    assert default["mapped"] and default["rss"] < 0.1 * default["size"], default
    assert read["tokens"] == mapped["tokens"] == default["tokens"]


def test_weights_used_in_place_stay_mapped(converted):
    # F32 is used straight from the mapping (nothing copied): the default must not drop it.
    m = converted(TinySpec(seed=21, hidden=1024, layers=2, heads=8, kv_heads=4, ffn=4096, tower="folder"),
                  "F32", "f32")
    default = load(m, None)
    assert default["mapped"] and default["rss"] > 0.5 * default["size"], default


def test_an_unknown_load_mode_is_one_line(repacked):
    from huatuo_local.runtime.engine.engine import Engine, EngineError, EngineOptions

    with pytest.raises(EngineError, match="unknown load mode 'fast'; use one of read, mmap, mmap-release"):
        Engine(repacked.llm_path, repacked.mmproj_path, EngineOptions(load="fast"))
