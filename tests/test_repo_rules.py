"""Rules of the source tree a reader relies on: every path a doc or comment names exists, and GGUF keys are
spelled in one module (models/gguf_keys.py).

Paths are read the way this project writes them: from the repository root (`runtime/core/scheduler.py`),
inside the runtime package (`core/scheduler.py`), or by their installed module path
(`huatuo_local/runtime/...`, which `pyproject.toml` maps onto the folders: ARCHITECTURE.md says how)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The first folder of a path that is this project's; anything else (llama.cpp's `tools/server/...`, a user's
# `study/...`) is not checked.
OURS = {"runtime", "models", "convert", "tests", "bench", "scripts", "docs", "src", "huatuo_local", "core",
        "engine", "serve", "cli", "llama", "images", "rpc", "eval", "verify", "quantize", "web", "examples"}
PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)+[\w-]+\.(?:py|md|sh|toml|html|js|css))(?![\w/])")
PACKAGES = {"huatuo_local/runtime/": "runtime/", "huatuo_local/models/": "models/",
            "huatuo_local/convert/": "convert/", "huatuo_local/": "src/huatuo_local/"}


def tracked() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / n for n in names.split() if n.endswith((".md", ".py", ".sh", ".toml")) or n == "justfile"]


def resolves(path: str, where: Path) -> bool:
    for prefix, folder in PACKAGES.items():
        if path.startswith(prefix):
            return (ROOT / folder / path[len(prefix):]).exists()
    return any((base / path).exists() for base in (ROOT, ROOT / "runtime", ROOT / "src", where.parent))


def stale_paths(files: list[Path]) -> list[str]:
    out = []
    for file in files:
        for n, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for m in PATH.finditer(line):
                path = m.group(1).lstrip("./")
                if path.split("/")[0] in OURS and not resolves(path, file):
                    out.append(f"{file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}:{n}: {path}")
    return out


def test_every_path_a_doc_or_comment_names_exists():
    here = Path(__file__).resolve()  # its own examples below name missing paths on purpose
    assert stale_paths([f for f in tracked() if f != here]) == []


def test_the_path_check_can_fail(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("see `runtime/scheduler.py` and runtime/core/scheduler.py, huatuo_local/runtime/api.py, "
                   "core/nothing.py, llama.cpp's tools/server/server.cpp\n")
    assert [s.split(": ")[1] for s in stale_paths([doc])] == ["runtime/scheduler.py", "core/nothing.py"]


KEY = re.compile(r"""["'](?:general|clip|tokenizer\.ggml|imatrix)\.[a-z_.]+["']""")


def test_gguf_keys_are_spelled_in_one_module():
    code = [f for f in tracked() if f.suffix == ".py" and f.parts[len(ROOT.parts)] in ("runtime", "models", "convert")]
    found = [f"{f.relative_to(ROOT)}: {m.group(0)}" for f in code if f.name != "gguf_keys.py"
             for m in KEY.finditer(f.read_text(encoding="utf-8"))]
    assert found == []
    assert KEY.search('fields.get("general.architecture")')  # the rule can fail
