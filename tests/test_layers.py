"""The import rule of docs/architecture.md: a module imports only from its own layer and those below, and no
modules import each other round a loop. The layers are read from the table in that document, so the picture a
reader sees and the rule the tests keep are one."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "llmstages"
DOC = ROOT / "docs" / "architecture.md"


def read_layers(doc: Path = DOC) -> list[tuple[str, list[str]]]:
    """[(layer name, module specs)] bottom first, from the rows `| N name | `a.py`, `dir/` | ... |`."""
    layers = []
    for line in doc.read_text().splitlines():
        m = re.match(r"\|\s*(\d+)\s+(\w+)\s*\|([^|]*)\|", line)
        if m:
            layers.append((int(m.group(1)), m.group(2), re.findall(r"`([^`]+)`", m.group(3))))
    assert [n for n, _, _ in layers] == list(range(1, len(layers) + 1)), f"{doc}: layers not numbered 1..N"
    return [(name, specs) for _, name, specs in layers]


def modules(package: Path) -> dict[str, Path]:
    """Dotted name relative to the package ('' for its __init__, 'model' for model/__init__.py) -> file."""
    out = {}
    for f in sorted(package.rglob("*.py")):
        parts = list(f.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def layer_of(module: str, is_package: bool, layers: list[tuple[str, list[str]]]) -> int | None:
    path = module.replace(".", "/")
    for i, (_, specs) in enumerate(layers):
        for spec in specs:
            if spec.endswith("/") and (path + "/").startswith(spec):
                return i
            if spec == "__init__.py" and module == "":
                return i
            if spec.endswith(".py") and not is_package and path == spec[:-3]:
                return i
    return None


def imports(module: str, file: Path, known: set[str], is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module relative to the package) for every import of the package in `file`, at any depth
    (function-local imports count); `from llmstages.x import y` names the module x.y where y is one."""
    pkg = module.split(".") if is_package else module.split(".")[:-1]
    pkg = [p for p in pkg if p]
    found = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["llmstages", *pkg[: len(pkg) - node.level + 1]]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        else:
            continue
        for t in targets:
            if t != "llmstages" and not t.startswith("llmstages."):
                continue
            rel = t.removeprefix("llmstages").removeprefix(".")
            if isinstance(node, ast.ImportFrom) and t != targets[-1] and rel not in known:
                continue  # `from m import name`: a name, not a module
            if (
                isinstance(node, ast.ImportFrom)
                and t == targets[-1]
                and any(x.removeprefix("llmstages").removeprefix(".") in known for x in targets[:-1])
            ):
                continue  # every name was a module: the package itself was not what was imported
            found.append((node.lineno, rel))
    return found


def violations(package: Path = PACKAGE, doc: Path = DOC) -> list[str]:
    """One line per broken rule: a module without a layer, an import of a higher layer, a cycle."""
    layers = read_layers(doc)
    mods = modules(package)
    packages = {m for m, f in mods.items() if f.name == "__init__.py"}
    where = {m: layer_of(m, m in packages, layers) for m in mods}
    out = [f"{mods[m].relative_to(package)}: in no layer of {doc.name}" for m, i in where.items() if i is None]
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for line, t in imports(m, f, set(mods), m in packages):
            if t not in mods or t == m:
                continue
            graph[m].add(t)
            a, b = where[m], where[t]
            if a is not None and b is not None and b > a:
                out.append(
                    f"{f.relative_to(package)}:{line}: {layers[a][0]} imports {t or '__init__'} from "
                    f"{layers[b][0]}, a layer above it"
                )
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_import_points_down() -> None:
    assert violations() == []


def _planted(tmp_path: Path, file: str, line: str) -> list[str]:
    copy = tmp_path / "llmstages"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / file
    target.write_text(target.read_text() + "\n\ndef _planted():\n    " + line + "\n")
    return violations(copy)


def test_a_planted_upward_import_fails(tmp_path: Path) -> None:
    found = _planted(tmp_path, "model/gpt.py", "from llmstages.stages import sft")
    assert found[0].startswith("model/gpt.py:") and "imports stages.sft from stages, a layer above" in found[0], found
    assert all(f.startswith("import cycle:") for f in found[1:]), found  # stages import the model: now a loop too


def test_a_planted_cycle_inside_a_layer_fails(tmp_path: Path) -> None:
    found = _planted(tmp_path, "train/optim.py", "from llmstages.train import loop")
    assert found == ["import cycle: train.loop -> train.optim"], found


def test_a_module_outside_every_layer_fails(tmp_path: Path) -> None:
    copy = tmp_path / "llmstages"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "utils.py").write_text("")
    assert violations(copy) == ["utils.py: in no layer of architecture.md"]


def test_the_layers_cover_what_the_design_names() -> None:
    names = [n for n, _ in read_layers()]
    for a, b in [("data", "model"), ("model", "peft"), ("peft", "store"), ("store", "train"), ("train", "rl")]:
        assert names.index(a) < names.index(b)
    assert names.index("rl") < names.index("eval") < names.index("stages") < names.index("app")
