"""Issue 20 on a machine without a GPU: what the CUDA fixes rely on, checked where it can be.

- The numbers huatuo-local passes to llama.cpp equal the pinned llama.cpp's own headers (a wrong
  device-type number made every CUDA GPU invisible).
- The C++ runtime is in the process's global symbol scope before llama.cpp loads, whatever the
  program imported first (without it, CUDA builds crashed at every model load after `import numpy`).
- The default GPU placement from a GGUF's own sizes: all, part, or nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from tiny_models import TinySpec

sys.path.insert(0, str(ROOT / "scripts"))
import engine_build  # noqa: E402

GIB = 1024**3


def vendored_header(name: str) -> str:
    """A header of the llama.cpp that the engine was built from: the source distribution setup cached, or the
    unpacked one named by HUATUO_LOCAL_ENGINE_SOURCE (scripts/gpu_check.py on a machine without network)."""
    unpacked = os.environ.get("HUATUO_LOCAL_ENGINE_SOURCE")
    if unpacked:
        return (Path(unpacked) / "vendor" / "llama.cpp" / name).read_text()
    sdist = engine_build.sdist_path()
    assert sdist.is_file(), (f"{sdist}: run scripts/bootstrap.py (it caches the engine's source), or name an "
                             "unpacked one in HUATUO_LOCAL_ENGINE_SOURCE")
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/vendor/llama.cpp/" + name))
        return tar.extractfile(member).read().decode()


def c_enum(header: str, enum: str) -> dict[str, int]:
    """The values of `enum NAME { ... }` as the C compiler assigns them (explicit or counted on)."""
    body = re.search(r"enum\s+" + enum + r"\s*\{(.*?)\}", header, re.S).group(1)
    body = re.sub(r"//[^\n]*|/\*.*?\*/", "", body, flags=re.S)
    out, nxt = {}, 0
    for entry in (e.strip() for e in body.split(",")):
        if not entry:
            continue
        name, _, value = (p.strip() for p in entry.partition("="))
        nxt = eval(value, {}, dict(out)) if value else nxt  # noqa: S307 (C integer expressions: 1 << 3, -1)
        out[name] = nxt
        nxt += 1
    return out


def test_constants_match_the_pinned_llama_cpp_headers():
    from huatuo_local.runtime.llama import constants as C

    ggml, backend, llama = (vendored_header(h) for h in ("ggml/include/ggml.h", "ggml/include/ggml-backend.h",
                                                         "include/llama.h"))
    wanted = {**c_enum(ggml, "ggml_log_level"), **c_enum(ggml, "ggml_type"), **c_enum(ggml, "ggml_op"),
              **c_enum(backend, "ggml_backend_dev_type"), **c_enum(llama, "llama_load_mode"),
              **c_enum(llama, "llama_token_attr"), **c_enum(llama, "llama_flash_attn_type")}
    mine = {k: v for k, v in vars(C).items() if k.isupper()}
    assert mine, "no constants"
    for name, value in mine.items():
        assert wanted.get(name) == value, f"{name} is {value} here but {wanted.get(name)} in llama.cpp's headers"
    # The bug this guards against, spelled out: a GPU is device type 1, not 2.
    assert wanted["GGML_BACKEND_DEVICE_TYPE_GPU"] == 1 and wanted["GGML_BACKEND_DEVICE_TYPE_ACCEL"] == 3


def test_quant_numbers_match_llama_cpp():
    """`--quant NAME` asks llama.cpp's quantizer for the file type of that name (llama.h's enum
    llama_ftype); a wrong number would silently make another quant than the one named."""
    from huatuo_local.convert.quantize import NEEDS_IMATRIX, QUANT_FTYPES

    ftypes = c_enum(vendored_header("include/llama.h"), "llama_ftype")
    for name, value in QUANT_FTYPES.items():
        assert ftypes.get(f"LLAMA_FTYPE_MOSTLY_{name}") == value, name
    assert NEEDS_IMATRIX <= set(QUANT_FTYPES)


def test_the_graph_node_layout_matches_ggml():
    """activations.GgmlTensor reads llama.cpp's graph nodes in place: its fields are ggml.h's struct
    ggml_tensor's, in order, with the array sizes of the pinned ggml."""
    from huatuo_local.runtime.engine.activations import GgmlTensor

    header = vendored_header("ggml/include/ggml.h")
    body = re.search(r"struct ggml_tensor\s*\{(.*?)\n    \};", header, re.S).group(1)
    body = re.sub(r"//[^\n]*|/\*.*?\*/", "", body, flags=re.S)
    sizes = {m.group(1): int(m.group(2)) for m in re.finditer(r"#\s*define\s+(GGML_MAX_\w+)\s+(\d+)", header)}
    fields = dict(GgmlTensor._fields_)
    names = []
    for decl in (d.strip() for d in body.split(";")):
        if not decl:
            continue
        m = re.search(r"(\w+)\s*(?:\[([^\]]+)\])?$", decl)
        names.append(m.group(1))
        if m.group(2):  # an array: its length from the header's own constants
            expr = re.sub(r"sizeof\(int32_t\)", "4", m.group(2))
            length = eval(expr, {}, sizes)  # noqa: S307 (GGML_MAX_OP_PARAMS / 4)
            assert fields[m.group(1)]._length_ == length, (m.group(1), fields[m.group(1)]._length_, length)
    assert names == [f[0] for f in GgmlTensor._fields_]


def c_struct_fields(header: str, struct: str) -> list[tuple[str, str]]:
    """(type, name) of each field of `struct NAME { ... };`, comments dropped."""
    body = re.search(r"struct " + struct + r"\s*\{(.*?)\};", header, re.S).group(1)
    body = re.sub(r"//[^\n]*|/\*.*?\*/", "", body, flags=re.S)
    decls = [" ".join(d.split()) for d in body.split(";") if d.strip()]
    return [(d.rsplit(" ", 1)[0].replace(" *", "*"), d.rsplit(" ", 1)[1].lstrip("*")) for d in decls]


def test_the_device_props_layout_matches_ggml():
    """devices.DevProps is filled by ggml_backend_dev_get_props: its fields are ggml-backend.h's, in order,
    with the C types' sizes (a missing or moved field would read the device id from the wrong bytes)."""
    import ctypes

    from huatuo_local.runtime.llama.devices import DevCaps, DevProps

    header = vendored_header("ggml/include/ggml-backend.h")
    c_types = {"const char*": ctypes.c_char_p, "size_t": ctypes.c_size_t, "bool": ctypes.c_bool,
               "enum ggml_backend_dev_type": ctypes.c_int, "struct ggml_backend_dev_caps": DevCaps}
    for ours, struct in ((DevCaps, "ggml_backend_dev_caps"), (DevProps, "ggml_backend_dev_props")):
        theirs = c_struct_fields(header, struct)
        assert [name for _, name in theirs] == [f[0] for f in ours._fields_], struct
        assert [c_types[t] for t, _ in theirs] == [f[1] for f in ours._fields_], struct


def test_the_gpus_counted_are_the_ones_llama_cpp_uses_by_default():
    """local_gpus() keeps llama.cpp's own default choice (src/llama.cpp, "default device selection"), so
    doctor and the default placement never count memory the model will not use."""
    from huatuo_local.runtime.llama.constants import GGML_BACKEND_DEVICE_TYPE_GPU as GPU
    from huatuo_local.runtime.llama.constants import GGML_BACKEND_DEVICE_TYPE_IGPU as IGPU
    from huatuo_local.runtime.llama.devices import RegistryDevice as D
    from huatuo_local.runtime.llama.devices import default_choice

    cuda0, cuda1 = D(GPU, "CUDA", "0000:01:00.0"), D(GPU, "CUDA", "0000:02:00.0")
    assert default_choice([cuda0, cuda1]) == [0, 1]
    # One card seen by two backends (a CUDA + Vulkan build): the first backend's device only.
    assert default_choice([cuda0, D(GPU, "Vulkan", "0000:01:00.0"), cuda1]) == [0, 2]
    assert default_choice([D(GPU, "CUDA", None), D(GPU, "Vulkan", None)]) == [0, 1]  # no ids: both
    # An integrated GPU beside a discrete one holds nothing; alone, it is used (one backend's only).
    assert default_choice([D(IGPU, "Vulkan", None), cuda0]) == [1]
    assert default_choice([D(IGPU, "Vulkan", None), D(IGPU, "SYCL", None), D(IGPU, "Vulkan", None)]) == [0, 2]
    # RPC workers register as GPUs but are never this machine's.
    assert default_choice([D(GPU, "RPC", None), D(IGPU, "Metal", None)]) == [1]
    assert default_choice([D(GPU, "RPC", None)]) == []


GLOBAL_SCOPE = """
import ctypes, sys
first = sys.argv[1]
if first != "none":
    __import__(first)
import huatuo_local
lib = ctypes.CDLL(None)
lib.dlsym.restype = ctypes.c_void_p
lib.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
addr = lib.dlsym(None, b"_ZNSo9_M_insertIlEERSoT_")  # std::ostream::_M_insert<long>, what print_info calls

class Info(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                ("saddr", ctypes.c_void_p)]

info = Info()
lib.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(Info)]
where = info.fname.decode() if addr and lib.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) else None
if len(sys.argv) > 2:  # then load a model and answer, as a notebook that imported numpy first would
    from huatuo_local import HuatuoChatbot
    with HuatuoChatbot(sys.argv[2], temperature=0, max_new_tokens=3, prefix_cache=False) as bot:
        bot.chat("Hello")
print(where)
"""


@pytest.mark.parametrize("first", ["numpy", "torch", "PIL.Image", "none"])
def test_the_cpp_runtime_is_global_whatever_was_imported_first(first, converted):
    model = converted(TinySpec(arch="qwen2", seed=8, tower="folder"), "F32", "f32")
    proc = subprocess.run([sys.executable, "-c", GLOBAL_SCOPE, first, str(model.manifest_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("libstdc++.so.6"), proc.stdout


def test_without_the_fix_the_runtime_is_not_global():
    """The control: the check above can fail (the C++ runtime is only local after `import numpy`)."""
    env = {"HUATUO_LOCAL_NO_CPP_GLOBAL": "1"}
    import os

    proc = subprocess.run([sys.executable, "-c", GLOBAL_SCOPE, "numpy"], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **env), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stdout + proc.stderr


def test_default_placement_from_the_models_own_sizes(converted):
    from huatuo_local.models.gguf_check import check_gguf
    from huatuo_local.runtime.llama.devices import HEADROOM, Gpu, plan_offload

    m = converted(TinySpec(arch="qwen2", seed=8, tower="folder", layers=4), "F32", "f32")
    llm, mmproj = check_gguf(m.llm_path, "llm"), check_gguf(m.mmproj_path, "mmproj")
    layer = sum(t[3] for n, t in llm.tensors.items() if n.startswith("blk.0."))
    vision = sum(t[3] for t in mmproj.tensors.values())

    def gpu(free: int) -> list[Gpu]:
        return [Gpu("CUDA0", "NVIDIA Test", free, 2 * free)]

    assert plan_offload(llm, mmproj, [], 4096).n_gpu_layers == 0
    everything = plan_offload(llm, mmproj, gpu(80 * GIB), 4096)
    assert everything.n_gpu_layers == -1 and everything.vision_on_gpu and everything.layers_on_gpu == 4
    assert everything.note == "GPU NVIDIA Test (80.0 GiB free): all 4 layers and the vision encoder"
    nothing = plan_offload(llm, mmproj, gpu(HEADROOM + 1), 4096)
    assert nothing.n_gpu_layers == 0 and not nothing.vision_on_gpu and "0 of 4 layers" in nothing.note
    # As free memory grows: first the vision encoder, then one layer after another, then everything.
    coarse = [plan_offload(llm, mmproj, gpu(HEADROOM + f), 4096) for f in range(0, 2 * GIB, 8 * 1024**2)]
    start = next(i for i, p in enumerate(coarse) if p.vision_on_gpu) * 8 * 1024**2
    fine = [plan_offload(llm, mmproj, gpu(HEADROOM + start + k * (layer // 3)), 4096) for k in range(-30, 60)]
    seen = coarse[: start // (8 * 1024**2)] + fine + coarse[start // (8 * 1024**2) + 1:]  # by free memory
    order = [(p.vision_on_gpu, p.layers_on_gpu) for p in seen]  # the encoder outranks any number of layers
    assert order == sorted(order) and order[0] == (False, 0) and order[-1] == (True, 4), order
    assert len({layers for vision, layers in order if vision}) >= 3, order  # layers come one by one
    assert layer > 0 and vision > 0


def test_the_placements_sizes_are_what_llama_cpp_allocates(converted):
    """The bytes the default placement counts, against llama.cpp's own log for the same model and context: the
    weights (its model buffer), the KV cache (its KV buffer) and a compute allowance no smaller than the compute
    buffer it plans for 512-position batches with flash attention (llama.cpp's choice on a GPU; planned on the
    CPU backend here, the same graph); and the threshold is exact: everything goes to the GPU with that much
    free, not with one byte less."""
    from huatuo_local.models.gguf_check import check_gguf
    from huatuo_local.runtime.llama.devices import HEADROOM, Gpu, gpu_needs, plan_offload
    from real_shapes import logged_buffer_mib

    m = converted(TinySpec(arch="qwen2", seed=8, tower="folder", layers=4), "F32", "f32")
    llm, mmproj = check_gguf(m.llm_path, "llm"), check_gguf(m.mmproj_path, "mmproj")
    needs = gpu_needs(llm, mmproj, 4096)
    mib = 1024**2
    kv = logged_buffer_mib(m.llm_path, rb"KV buffer size\s*=\s*([0-9.]+) MiB", 4096, plan_only=False)
    assert kv and abs(sum(kv) * mib - len(needs.layers) * needs.kv_layer) < 0.02 * mib, (kv, needs)
    weights = logged_buffer_mib(m.llm_path, rb"model buffer size\s*=\s*([0-9.]+) MiB", 4096, plan_only=False)
    assert weights and abs(sum(weights) * mib - (sum(needs.layers) + needs.other)) < 0.05 * mib + 0.01 * sum(
        needs.layers), (weights, needs)
    compute = logged_buffer_mib(m.llm_path, rb"compute buffer size\s*=\s*([0-9.]+) MiB", 4096, 512, flash_attn=True)
    assert compute and needs.compute >= sum(compute) * mib, (compute, needs.compute)
    at = HEADROOM + needs.full + needs.vision
    assert plan_offload(llm, mmproj, [Gpu("CUDA0", "T", at, 2 * at)], 4096).n_gpu_layers == -1
    below = plan_offload(llm, mmproj, [Gpu("CUDA0", "T", at - 1, 2 * at)], 4096)
    # One byte short: the embeddings and output (llama.cpp's last "layer") stay on the CPU, the rest goes.
    assert below.n_gpu_layers == below.layers_on_gpu == len(needs.layers) and below.vision_on_gpu, below
    assert "the output layer on the CPU" in below.note


def test_doctor_lists_the_gpus_llama_cpp_uses(tmp_path, converted):
    """doctor (JSON and text) on what this engine was built with: a CPU build (CI) has no GPU and says so; a
    GPU build lists each GPU with its memory and where an installed model goes, or says why it found none."""
    home = {"HUATUO_LOCAL_HOME": str(tmp_path)}
    model = converted(TinySpec(arch="qwen2", seed=8, tower="folder"), "F32", "f32")
    stored = tmp_path / "models" / "tiny"
    stored.mkdir(parents=True)
    for f in (model.llm_path, model.mmproj_path, model.manifest_path):
        shutil.copy(f, stored / f.name)
    report = json.loads(run_cli("doctor", "--json", env=home).stdout)
    text = run_cli("doctor", env=home).stdout
    # The backends come from the loaded engine's registry, not from setup's record.
    assert f"backends {', '.join(report['backends'])}" in text
    gpu_backends = set(report["backends"]) - {"CPU", "RPC", "BLAS"}
    if not gpu_backends:  # setup's CPU build, as in CI
        assert set(report["backends"]) == {"CPU", "RPC"}, report["backends"]
        assert report["gpus"] == [] and report["gpu_offload"] is False and report["recommended"]["n_gpu_layers"] == 0
        assert report["idle_backends"] == []  # no GPU backend waits for a device (RPC is not one)
        assert "GPU              none (the CPU runs the model)" in text
    elif report["idle_backends"]:  # built for a GPU this machine does not have (or cannot reach)
        assert report["gpus"] == [] and f"no GPU: this engine is built for {report['idle_backends'][0]}" in text
    else:
        assert report["gpus"] and report["gpu_offload"] is True and report["recommended"]["n_gpu_layers"] == -1
        for g in report["gpus"]:
            assert g["total_gib"] > 0 and 0 <= g["free_gib"] <= g["total_gib"], g
            assert f"GPU              {g['name']}: {g['description']}, {g['free_gib']:.1f} GiB free" in text
        assert report["placements"]["tiny:f32"].startswith("GPU ") and "all 2 layers and the vision encoder" in text


def test_a_gpu_build_without_a_device_says_why_in_one_line():
    """A CUDA build on a machine whose driver is missing registers CUDA with no device; doctor and the
    load say so instead of silently running on the CPU (seen with a CUDA 13 build and no driver)."""
    from huatuo_local.runtime.llama.devices import no_device_note

    assert no_device_note([]) == ""
    note = no_device_note(["CUDA"])
    assert "\n" not in note and "built for CUDA" in note and "nvidia-smi" in note and "CPU" in note
    assert "Vulkan" in no_device_note(["Vulkan"]) and "nvidia-smi" not in no_device_note(["Vulkan"])


def test_flash_attention_is_llama_cpps_choice_on_a_gpu_and_off_on_the_cpu():
    """On a GPU the context asks for llama.cpp's own choice (flash attention where the device has it,
    as llama-bench, llama-mtmd-cli and llama-server do by default); on the CPU it stays off (no faster,
    and the fidelity figures were measured so); a quantized KV cache always has it (llama.cpp needs it)."""
    from huatuo_local.runtime.engine.engine import EngineOptions, flash_attn_type
    from huatuo_local.runtime.llama import constants as C

    f16, q8 = C.GGML_TYPE_F16, C.GGML_TYPE_Q8_0
    assert flash_attn_type(EngineOptions(), f16, on_gpu=False) == C.LLAMA_FLASH_ATTN_TYPE_DISABLED
    assert flash_attn_type(EngineOptions(), f16, on_gpu=True) == C.LLAMA_FLASH_ATTN_TYPE_AUTO
    assert flash_attn_type(EngineOptions(flash_attn=False), f16, on_gpu=True) == C.LLAMA_FLASH_ATTN_TYPE_DISABLED
    assert flash_attn_type(EngineOptions(flash_attn=True), f16, on_gpu=False) == C.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert flash_attn_type(EngineOptions(), q8, on_gpu=False) == C.LLAMA_FLASH_ATTN_TYPE_ENABLED
