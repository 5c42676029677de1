"""The package's shape: no import cycles, a library that does not import the study, and stages
that depend on exactly the code they run (read from dvc.yaml, checked with the standard
library's own import finder rather than with the generator that wrote it)."""

from __future__ import annotations

import ast
import json
import modulefinder
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffpath"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(path: Path, name: str, known: set[str]) -> set[str]:
    """Every diffpath module ``path`` imports anywhere (function bodies too)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & known
            found.update(subs or {target})
            if any(f"{target}.{a.name}" not in known for a in node.names):
                found.add(target)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imported(path, name, set(mods)) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_function_level_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_inside_the_package():
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles (function-level imports included): {cycles}"


def test_the_library_does_not_import_the_study():
    graph = _graph()
    bad = {m: sorted(t for t in targets if t == "diffpath.study" or t.startswith("diffpath.study."))
           for m, targets in graph.items()
           if not (m == "diffpath.study" or m.startswith("diffpath.study."))}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"modules outside diffpath/study import the study: {bad}"


def test_core_imports_nothing_else_of_the_package():
    graph = _graph()
    bad = {m: sorted(t for t in targets if not t.startswith("diffpath.core") and t != "diffpath")
           for m, targets in graph.items() if m.startswith("diffpath.core")}
    assert not any(bad.values()), f"diffpath.core imports higher layers: {bad}"


def _notebook_script(notebook: Path, tmp: Path) -> Path:
    nb = json.loads(notebook.read_text())
    lines = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        lines += [ln for ln in src.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    script = tmp / (notebook.stem + ".py")
    script.write_text("\n".join(lines) + "\n")
    return script


def _runs(script: Path) -> set[str]:
    """The package files a script runs, found by the standard library's ``modulefinder`` (it
    reads the bytecode's imports, function bodies included)."""
    finder = modulefinder.ModuleFinder(path=[str(ROOT)], excludes=[])
    finder.run_script(str(script))
    files = set()
    for mod in finder.modules.values():
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve().is_relative_to(PACKAGE):
            files.add(str(Path(f).resolve().relative_to(ROOT)))
    return files


def test_each_stage_depends_on_exactly_the_code_it_runs(tmp_path):
    """dvc.yaml's package deps of a stage = what `python -m diffpath.study` and the stage's
    notebook import; in particular the dvc.yaml generator is not a dependency of any stage."""
    entry = _runs(PACKAGE / "study" / "__main__.py")
    assert "diffpath/study/runner.py" in entry
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, st in stages.items():
        st = st.get("do", st)
        deps = {d for d in st["deps"] if d.startswith("diffpath/") and d.endswith(".py")}
        notebook = next(d for d in st["deps"] if d.startswith("notebooks/"))
        runs = entry | _runs(_notebook_script(ROOT / notebook, tmp_path))
        for cmd in st["cmd"] if isinstance(st["cmd"], list) else [st["cmd"]]:  # `python -m MODULE` after it
            module = cmd.split()[2]
            if module != "diffpath.study":
                runs |= _runs(ROOT / (module.replace(".", "/") + ".py"))
        assert "diffpath/study/pipeline.py" not in deps, f"stage {name} depends on the dvc.yaml generator"
        assert deps - runs == set(), f"stage {name} depends on modules it does not run: {sorted(deps - runs)}"
        assert runs - deps == set(), f"stage {name} runs modules it does not depend on: {sorted(runs - deps)}"
