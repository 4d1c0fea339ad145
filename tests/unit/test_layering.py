"""The layering rule, checked on the source: compiler -> passes -> kernels, never back up, and no import cycle.

Every `import` / `from ... import` statement counts, function-level ones included (a lazy import still runs
the module it names); only imports under `if TYPE_CHECKING:` are skipped. The source folders map onto the
package as pyproject.toml says: `compiler/` is `sdcompiler`, `passes/` is `sdcompiler.passes`, `kernels/` is
`sdcompiler.kernels`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"compiler": "sdcompiler", "passes": "sdcompiler.passes", "kernels": "sdcompiler.kernels"}
# what each layer may import of ours (a module name prefix); the compiler layer may import everything
ALLOWED = {
    "sdcompiler.passes": ("sdcompiler.passes", "sdcompiler.kernels"),
    "sdcompiler.kernels": ("sdcompiler.kernels",),
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the three code folders."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _import_nodes(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_block(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that `name` (in `path`) imports, by dotted name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the module pkg.sub; `from pkg import name` reads pkg itself
            subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            targets = subs + ([base] if len(subs) < len(node.names) else [])
        for target in targets:
            if target == "sdcompiler" or target.startswith("sdcompiler."):
                while target not in modules:  # `import sdcompiler.x.attr`-like names: the module that holds it
                    target = target.rpartition(".")[0]
                if target != name:
                    found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer(module: str) -> str:
    for prefix in ("sdcompiler.kernels", "sdcompiler.passes"):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    return "sdcompiler"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_lower_layers_never_import_upper_ones():
    violations = []
    for module, targets in import_graph().items():
        allowed = ALLOWED.get(layer(module))
        if allowed is None:
            continue
        violations += [f"{module} imports {t}" for t in sorted(targets) if layer(t) not in allowed]
    assert not violations, "imports against compiler -> passes -> kernels:\n" + "\n".join(violations)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_see_function_level_imports_and_cycles(tmp_path):
    """The checker itself: a lazy import inside a function is an edge, and a two-module loop is a cycle."""
    (tmp_path / "a.py").write_text("def f():\n    from sdcompiler.b import g\n")
    (tmp_path / "b.py").write_text("import sdcompiler.a\n")
    modules = {"sdcompiler.a": tmp_path / "a.py", "sdcompiler.b": tmp_path / "b.py"}
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph == {"sdcompiler.a": {"sdcompiler.b"}, "sdcompiler.b": {"sdcompiler.a"}}
    assert cycles(graph) == [["sdcompiler.a", "sdcompiler.b"]]


BLOCKED_IMPORT = """
import importlib, importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        parts = name.split(".")
        if parts[0] == "sdcompiler" and len(parts) > 1 and parts[1] not in ("passes", "kernels", "version"):
            raise ImportError(f"blocked: {name} (a compiler module)")
        return None

sys.meta_path.insert(0, Block())
for name in sys.argv[1:]:
    importlib.import_module(name)
print("imported", len(sys.argv) - 1)
"""


def test_every_pass_and_kernel_module_imports_with_the_compiler_layer_blocked():
    """The rule by construction: each module of sdcompiler.passes / sdcompiler.kernels imports (module-level
    code) in a fresh interpreter where importing any other sdcompiler module raises."""
    import subprocess
    import sys

    names = [name for name in module_files() if layer(name) != "sdcompiler"]
    proc = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT, *names], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"imported {len(names)}" in proc.stdout
