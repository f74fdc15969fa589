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


# FaultAhead (engine/loading.py): the thread that faults in llama.cpp's fresh weight buffer ahead of the loader.
BUDGET_CHILD = textwrap.dedent("""
    import ctypes, json, mmap, threading, time
    from huatuo_local.runtime.engine.loading import FaultAhead
    from huatuo_local.runtime.system import rss
    MIB = 1 << 20
    filler = mmap.mmap(-1, 96 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    filler.write(b"x" * (96 * MIB))  # resident: what llama.cpp's mapped file is at the first progress call
    FaultAhead.MIN_BYTES = 64 * MIB
    ahead = FaultAhead(file_size=0)
    buffer = mmap.mmap(-1, 128 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # the loader's fresh buffer
    small = mmap.mmap(-1, 8 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # too small to be the weights'
    # Fenced by inaccessible pages at both ends, so the kernel does not merge it with the buffer into one mapping
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    base = ctypes.addressof(ctypes.c_char.from_buffer(small))
    libc.mprotect(base, mmap.PAGESIZE, 0)
    libc.mprotect(base + 8 * MIB - mmap.PAGESIZE, mmap.PAGESIZE, 0)
    peak, stop = [0], [False]

    def watch():
        while not stop[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    ahead.progress(0.0)
    budget = rss()
    w = threading.Thread(target=watch)
    w.start()
    time.sleep(0.3)
    before_room = ahead.faulted  # no room yet: nothing may be faulted in
    filler.close()  # llama.cpp's mapped pages dropped behind the loader: 96 MiB of room
    deadline = time.time() + 20
    while ahead.faulted < 64 * MIB and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # and whatever more it would take
    ahead.finish()
    stop[0] = True
    w.join()

    def resident(m):
        vec = (ctypes.c_ubyte * (len(m) // mmap.PAGESIZE))()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(len(m)), vec)
        return sum(v & 1 for v in vec) * mmap.PAGESIZE

    print(json.dumps({"before_room": before_room, "faulted": ahead.faulted, "resident": resident(buffer),
                      "small": resident(small), "budget": budget, "peak": peak[0], "alive": ahead.thread.is_alive()}))
""")


def test_fault_ahead_fills_only_the_room_dropped_pages_leave():
    proc = subprocess.run([sys.executable, "-c", BUDGET_CHILD], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    assert r["before_room"] == 0, r  # resident memory at the first progress call is the ceiling
    # then the room made, in whole chunks (Python's own allocations may take part of the last one), no more
    assert 64 * mib <= r["faulted"] <= 96 * mib, r
    assert r["resident"] == r["faulted"], r  # all of it in the fresh buffer, from its start
    assert r["small"] == 0, r  # a small mapping is not the weights' buffer: left alone
    assert r["peak"] <= r["budget"] + 4 * mib, r  # never above the ceiling (a few MiB of Python's own)
    assert not r["alive"], r  # finish() stops the thread


def test_fault_ahead_during_a_real_load_changes_no_answer(repacked):
    # The tiny model's buffer is far below the sizes FaultAhead waits for, and the room it may use: both
    # lowered here so that the thread runs through llama.cpp's own buffer while llama.cpp loads into it.
    child = CHILD.replace("from huatuo_local.runtime.engine.engine import Engine, EngineOptions",
                          "from huatuo_local.runtime.engine.engine import Engine, EngineOptions\n"
                          "from huatuo_local.runtime.engine.loading import FaultAhead\n"
                          "FaultAhead.MIN_BYTES = 1 << 20\nFaultAhead.HEADROOM = 1 << 30")
    child = child.replace('"tokens": out}', '"tokens": out, "faulted": eng.faulted_ahead}')
    proc = subprocess.run([sys.executable, "-c", child, str(repacked.llm_path), str(repacked.mmproj_path), ""],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ahead = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ahead["faulted"] > 0, ahead
    assert ahead["tokens"] == load(repacked, "read")["tokens"]


def test_the_cpu_micro_batch_follows_the_model_width_in_its_header(repacked):
    from huatuo_local.runtime.engine.engine import Engine, EngineOptions, default_ubatch

    # Read from the LLM's header: this model is 1024 wide, so the CPU's 256; a GPU, or given, as asked.
    with Engine(repacked.llm_path, repacked.mmproj_path, EngineOptions(n_ctx=256)) as eng:
        assert eng.width == 1024 and eng.options.ubatch == 256
    with Engine(repacked.llm_path, repacked.mmproj_path, EngineOptions(n_ctx=256, n_ubatch=128)) as eng:
        assert eng.options.ubatch == 128
    # The 7B is 3584 wide (256 on the CPU); the 34B 7168 (512, llama.cpp's own default, as on a GPU).
    assert (default_ubatch(False, 3584), default_ubatch(False, 7168), default_ubatch(True, 3584)) == (256, 512, 512)
