"""The package's import graph has no circle, read from the source (ast), every import counted:
module level, inside functions (lazy) and under TYPE_CHECKING alike, since each says which
module depends on which. `from pkg import name` is an edge to pkg.name when that is a module."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fedalign_dist"


def package_modules(root: Path) -> dict[str, Path]:
    """{dotted module name: file}; a package is named by its __init__.py."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports anywhere in its file."""
    def known(name: str) -> str | None:  # `a.b.SomeClass` -> `a.b`
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {m for m in map(known, names) if m and m != module}
    return found


def import_circles(root: Path) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    modules = package_modules(root)
    edges = {m: sorted(imported_modules(m, p, modules)) for m, p in modules.items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return circles


def test_the_package_has_no_import_circle():
    circles = import_circles(PACKAGE)
    assert not circles, "import circles (each a set of modules that import one another):\n" + "\n".join(
        f"  {len(c)} modules: {', '.join(c)}" for c in circles)


def test_the_config_section_schema_imports_nothing_of_the_package():
    modules = package_modules(PACKAGE)
    assert imported_modules("fedalign_dist.config_sections", modules["fedalign_dist.config_sections"], modules) == set()
    assert len(modules["fedalign_dist.config"].read_text().splitlines()) <= 300


def test_the_circle_finder_finds_circles(tmp_path):
    """The check can fail: a lazy import inside a function and one under TYPE_CHECKING both
    close a circle."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .c import g\n")
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import X\n")
    (pkg / "d.py").write_text("import pkg.a\n")
    assert import_circles(pkg) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]
    (pkg / "sub" / "c.py").write_text("X = 1\n")
    assert import_circles(pkg) == []


@pytest.mark.parametrize("plugin_import", ["fedalign_dist.config", "fedalign_dist.config_sections"])
def test_config_section_is_importable_where_plugins_find_it(plugin_import):
    import importlib

    from fedalign_dist.config_sections import ConfigSection
    assert importlib.import_module(plugin_import).ConfigSection is ConfigSection


def test_the_package_folders_import_no_circle():
    """At the level of folders too (clients/, strategies/, distributed/...): a folder that imports
    another imports nothing of a folder that imports it. The modules at the package's top (the
    runner and the client round) use every folder and are left out."""
    modules = package_modules(PACKAGE)
    folder = {m: m.split(".")[1] for m, p in modules.items() if p.parent != PACKAGE}
    edges = {(folder[m], folder[t]) for m, p in modules.items() if m in folder
             for t in imported_modules(m, p, modules) if t in folder and folder[t] != folder[m]}
    reach = set(edges)  # a reaches b through any chain of imports
    for via in set(folder.values()):
        reach |= {(a, b) for a, v in reach if v == via for w, b in reach if w == via}
    both = sorted(f"{a} <-> {b}" for a, b in reach if (b, a) in reach and a < b)
    assert not both, f"folders that import one another (directly or through others): {', '.join(both)}"
