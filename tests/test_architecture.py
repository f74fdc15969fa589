"""The house rules, read from the source (ast, nothing imported or run): imports point down the layers,
there is no import cycle (imports inside functions count too), and no function is longer than about
60 lines without a reason written beside it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

# Where each folder's modules live in the package.
PACKAGES = {"src/huatuo_local": "huatuo_local", "models": "huatuo_local.models", "convert": "huatuo_local.convert",
            "runtime": "huatuo_local.runtime"}
# Layers, lowest first; a module may import its own group and lower ranks only. Front-ends share a rank
# and may not import each other.
RANKS = [
    ({"huatuo_local.native", "huatuo_local.version", "huatuo_local.runtime"}, 0),
    ({"huatuo_local.models"}, 0),
    ({"huatuo_local.runtime.system", "huatuo_local.runtime.trace"}, 0),
    ({"huatuo_local.convert"}, 1),
    ({"huatuo_local.runtime.llama", "huatuo_local.runtime.images"}, 1),
    ({"huatuo_local.runtime.rpc"}, 2),
    ({"huatuo_local.runtime.engine"}, 3),
    ({"huatuo_local.runtime.core"}, 4),
    ({"huatuo_local.runtime.cluster"}, 5),  # replicas on Ray: core's scheduler in other processes
    ({"huatuo_local.runtime.api", "huatuo_local.runtime.serve", "huatuo_local.runtime.eval",
      "huatuo_local.runtime.verify", "huatuo_local.runtime.quantize"}, 6),
    ({"huatuo_local.runtime.cli"}, 7),
    ({"huatuo_local", "huatuo_local.__main__"}, 8),  # the package's front door: HuatuoChatbot, the command
]
EXACT = {"huatuo_local", "huatuo_local.runtime"}
# The converter's public entries, the only ones the runtime may use (from its command line).
CONVERT_PUBLIC = {"huatuo_local.convert.pipeline", "huatuo_local.convert.pull"}
LONG = 60


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imports(name: str, path: Path, known: set[str], type_hints: bool = False) -> set[str]:
    """The huatuo_local modules `name` imports anywhere in its file (function bodies included); with
    `type_hints`, also those imported only for a type checker (under `if TYPE_CHECKING:`)."""
    is_package = path.name == "__init__.py"
    found = set()
    tree = ast.parse(path.read_text())
    for block in ast.walk(tree):
        if not type_hints and isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING":
            block.body = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:  # `from pkg import module` names the module; else its package
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def group_of(module: str) -> tuple[str, int]:
    best = ("", -1)
    for names, rank in RANKS:
        for g in names:
            # These packages are one module each (their __init__), not prefixes: a new module or folder directly
            # under them must be given its layer here.
            covers = module == g or (module.startswith(g + ".") and g not in EXACT)
            if covers and len(g) > len(best[0]):
                best = (g, rank)
    assert best[1] >= 0, f"{module} belongs to no layer: add it to RANKS"
    return best


def graph(type_hints: bool = False) -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods), type_hints) for name, path in mods.items()}


def layer_violations(g: dict[str, set[str]]) -> list[str]:
    """Every import that points up the layers, sideways between front-ends, or into the converter's insides."""
    wrong = []
    for src, targets in g.items():
        g_src, r_src = group_of(src)
        for dst in targets:
            g_dst, r_dst = group_of(dst)
            if g_dst == g_src:
                continue
            if g_dst == "huatuo_local.convert" and g_src.startswith("huatuo_local.runtime"):
                if g_src != "huatuo_local.runtime.cli" or not any(dst == p or dst.startswith(p + ".")
                                                                   for p in CONVERT_PUBLIC):
                    wrong.append(f"{src} -> {dst} (only the command line uses the converter's public entries)")
                continue
            if r_dst >= r_src:
                wrong.append(f"{src} -> {dst} (rank {r_src} -> {r_dst})")
    return sorted(wrong)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `g` (Tarjan's strongly connected components of more than one module)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(g):
        if v not in index:
            strongconnect(v)
    return found


def test_imports_point_down_the_layers():
    wrong = layer_violations(graph())
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    """Counting the imports made only for type hints: a cycle through them is still two modules that cannot
    be understood, or moved, one without the other."""
    found = cycles(graph(type_hints=True))
    assert not found, found


def test_long_functions_say_why():
    too_long = []
    for path in modules().values():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            first = body[1] if (len(body) > 1 and isinstance(body[0], ast.Expr)
                                and isinstance(body[0].value, ast.Constant)) else body[0]
            length = node.end_lineno - first.lineno + 1
            top = (min(d.lineno for d in node.decorator_list) if node.decorator_list else node.lineno) - 1
            reason = top > 0 and lines[top - 1].lstrip().startswith("# Long:")
            if length > LONG and not reason:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, "split these, or write `# Long: why` above them:\n" + "\n".join(too_long)


def test_the_rules_can_fail(tmp_path):
    """The checks above see what they exist for, on made-up graphs and files (nothing written in the source
    tree): an upward import, an import of the package root from inside it, a front-end importing another,
    a cycle, an import made only for type hints (counted for cycles only), and a module in no layer."""
    import pytest

    assert group_of("huatuo_local.runtime.core.scheduler") == ("huatuo_local.runtime.core", 4)
    upward = {"huatuo_local.runtime.engine.engine": {"huatuo_local.runtime.core.session"}}
    assert layer_violations(upward) == ["huatuo_local.runtime.engine.engine -> huatuo_local.runtime.core.session "
                                        "(rank 3 -> 4)"]
    assert layer_violations({"huatuo_local.convert.pipeline": {"huatuo_local"}}) == [
        "huatuo_local.convert.pipeline -> huatuo_local (rank 1 -> 8)"]
    assert layer_violations({"huatuo_local.runtime.serve.app": {"huatuo_local.runtime.eval.run"}})
    assert layer_violations({"huatuo_local.runtime.core.loading": {"huatuo_local.convert.pull"}})
    assert not layer_violations({"huatuo_local.runtime.cli.store": {"huatuo_local.convert.pull"}})
    assert cycles({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}}) == [["a.x", "a.y", "a.z"]]
    assert cycles({"a.x": {"a.y"}, "a.y": set()}) == []
    for placeless in ("huatuo_local.nowhere", "huatuo_local.runtime.newlayer.x"):
        with pytest.raises(AssertionError, match="belongs to no layer"):
            group_of(placeless)
    fake = tmp_path / "upward.py"
    fake.write_text("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                    "from huatuo_local.runtime.core.session import Session\n"
                    "if TYPE_CHECKING:\n    from huatuo_local.runtime.serve.app import App\n"
                    "def f():\n    from huatuo_local.runtime.cli import main\n")
    known = set(modules())
    assert imports("huatuo_local.runtime.engine.upward", fake, known) == {
        "huatuo_local.runtime.core.session", "huatuo_local.runtime.cli"}
    assert imports("huatuo_local.runtime.engine.upward", fake, known, type_hints=True) == {
        "huatuo_local.runtime.core.session", "huatuo_local.runtime.cli", "huatuo_local.runtime.serve.app"}


def test_the_installed_package_works_from_any_folder(tmp_path):
    """`pip install .` (not editable) then `python -m huatuo_local` from the repository root uses the
    installed copy: the source tree does not shadow it."""
    import shutil

    target = tmp_path / "site"
    # A copy of the source is built, not the checkout: building in the source tree leaves build/ and *.egg-info
    # there (and fails on a read-only checkout).
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                ".pytest_cache", ".ruff_cache", ".carry", ".whl",
                                                                ".gpu", ".gl"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code = ("import huatuo_local, huatuo_local.runtime.cli, huatuo_local.runtime.serve.page as p; "
            "print(huatuo_local.__file__); print(huatuo_local.runtime.cli.__file__); "
            "print((p.WEB / 'app.js').is_file())")
    for cwd in (ROOT, tmp_path):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                             env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=120)
        assert out.returncode == 0, out.stderr
        package, cli, web = out.stdout.split()
        assert package.startswith(str(target)) and cli.startswith(str(target)) and web == "True", out.stdout
        version = subprocess.run([sys.executable, "-m", "huatuo_local", "--version"], capture_output=True,
                                 text=True, cwd=cwd, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                                 timeout=120)
        assert version.returncode == 0 and version.stdout.startswith("huatuo-local "), version.stderr
