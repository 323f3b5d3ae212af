"""Package shape: floors, no import cycle, no private cross-module names, torch-free analysis."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import internal_policy_lens

ROOT = Path(internal_policy_lens.__file__).parent
# Modules a notebook imports to read and plot finished runs: none of them may import torch.
TORCH_FREE = (
    "internal_policy_lens",
    "internal_policy_lens.config",
    "internal_policy_lens.folders",
    "internal_policy_lens.bundled",
    "internal_policy_lens.model.families",  # the command line lists the families at start-up
    "internal_policy_lens.data.records",
    "internal_policy_lens.data.encode",
    "internal_policy_lens.analysis.convergence",
    "internal_policy_lens.analysis.plots",
    "internal_policy_lens.analysis.figures",
    "internal_policy_lens.analysis.charts",
    "internal_policy_lens.analysis.report",
    "internal_policy_lens.runs.io",
    "internal_policy_lens.runs.writer",  # the streamed finish: Arrow and pandas only
    "internal_policy_lens.tables",  # summary_table, delta_table (entropy_table loads torch lazily)
    "internal_policy_lens.tables.batch",
    "internal_policy_lens.train.folder",
    "internal_policy_lens.data.answers",
    "internal_policy_lens.cli",  # `ipl --help`, `ipl plot`: torch only where a command needs it
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of a package module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # `from .lens import reduce`: a module, not a name
                    found.append((sub, [], node.lineno))
                elif base in modules:
                    found.append((base, [alias.name], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name in modules]
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {target for target, _, _ in _imports(name, path, modules)}
        for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_graph_is_acyclic():
    graph = _graph()
    assert (
        len(graph) > 30
        and "internal_policy_lens.tables.compute" in graph["internal_policy_lens.commands.entropy"]
    )
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def _floors() -> dict[str, int]:
    """The package docstring's floors: top-level module or folder -> its floor."""
    block = internal_policy_lens.__doc__.split("never from above", 1)[1].split("\n\n")[1]
    floors = {}
    for line in block.splitlines():
        number, names = re.fullmatch(r"\s+(\d+)\s+([\w, ]+):.*", line).groups()
        floors.update({name.strip(): int(number) for name in names.split(",")})
    return floors


def _climbs(graph: dict[str, set[str]], floors: dict[str, int]) -> list[str]:
    """Every import of a module from a higher floor than its own, as ``a (i) -> b (j)``."""

    def floor(module: str) -> int:
        return floors[module.split(".")[1]] if "." in module else -1  # the package: lazy names

    return [
        f"{source} ({floor(source)}) -> {target} ({floor(target)})"
        for source, targets in sorted(graph.items())
        for target in sorted(targets)
        if floor(target) > floor(source)
    ]


def test_the_floor_check_finds_an_import_that_climbs():
    floors = {"data": 1, "lens": 3, "runs": 5}
    graph = {"p.lens.a": {"p.data.b", "p.runs.c"}, "p.runs.c": {"p.lens.a"}, "p.data.b": set()}
    assert _climbs(graph, floors) == ["p.lens.a (3) -> p.runs.c (5)"]


def test_every_module_has_a_floor():
    floors = _floors()
    assert floors["folders"] == 0 and floors["cli"] == max(floors.values())
    tops = {name.split(".")[1] for name in _modules() if "." in name}
    assert tops - set(floors) == set(), "add these to the floors in the package docstring"
    assert set(floors) - tops == set(), "the docstring names floors the package lacks"


def test_no_import_climbs_back_up_the_floors():
    assert _climbs(_graph(), _floors()) == []


def test_no_module_uses_another_modules_private_names():
    modules = _modules()
    offences = []
    for name, path in modules.items():
        for target, names, line in _imports(name, path, modules):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            offences += [f"{path.name}:{line} imports {target}.{n}" for n in private]
        tree = ast.parse(path.read_text())
        aliases = {  # names bound to package modules: `from . import plots`, `import x.y as z`
            (a.asname or a.name): a.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for a in node.names
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and any(
                    m.endswith("." + aliases[node.value.id]) or m == aliases[node.value.id]
                    for m in modules
                )
            ):
                offences.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert offences == []


@pytest.mark.parametrize("module", TORCH_FREE)
def test_analysis_imports_without_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_lazy_exports_resolve():
    code = (
        "import sys, internal_policy_lens as ipl\n"
        "from internal_policy_lens import plots, convergence_summary, suggest_layer, open_run\n"
        "assert 'torch' not in sys.modules\n"
        "assert all(getattr(ipl, name) is not None for name in ipl.__all__)\n"
        "assert 'torch' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        internal_policy_lens.nope  # noqa: B018
