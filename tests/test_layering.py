"""Which module may import which (docs/architecture.md), read from the source with `ast`:
nothing is imported, so a cycle or a slow import cannot hide a violation.

- the built-ins (`passes/`, `plugins/`) import the core only through `compressor.api`;
- passes may import plugins, plugins never import passes;
- the core (`compressor/`, `compressor/bench/` included) imports no built-in plugin or pass.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# installed package -> its source folder, most specific first
SOURCES = {
    "compressor.passes": "passes",
    "compressor.plugins": "plugins",
    "compressor.cuda": "cuda",
    "compressor": "compressor",
}
# what a built-in may import of compressor.*: the API, the built-ins and the kernels
BUILT_IN_ALLOWED = ("compressor.api", "compressor.passes", "compressor.plugins", "compressor.cuda")


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _package(file: Path) -> str:
    rel = file.relative_to(ROOT)
    package = {folder: name for name, folder in SOURCES.items()}[rel.parts[0]]
    return ".".join([package, *rel.parts[1:-1]])


@functools.cache
def _imports(file: Path) -> list[tuple[int, str, str, str]]:
    return list(_walk_imports(file))


def _walk_imports(file: Path) -> Iterator[tuple[int, str, str, str]]:
    """(line, imported module, the statement as written, enclosing function) of every import
    in the file, at module level, under TYPE_CHECKING or inside a function. `from compressor
    import x` yields `compressor.x` when x is a module of compressor, else `compressor`."""
    tree = ast.parse(file.read_text(), str(file))
    scopes: dict[ast.AST, str] = {}

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = child.name if scope == "<module>" else f"{scope}.{child.name}"
            scopes[child] = scope
            visit(child, inner)

    visit(tree, "<module>")
    for node in ast.walk(tree):
        scope = scopes.get(node, "<module>")
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, f"import {alias.name}", scope
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's own package
                package = _package(file).split(".")
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = ", ".join(a.name for a in node.names)
            written = f"from {'.' * node.level}{node.module or ''} import {names}"
            modules = {f"{base}.{a.name}" for a in node.names} if base == "compressor" else set()
            for module in sorted({m if _is_module(m) else base for m in modules} or {base}):
                yield node.lineno, module, written, scope


def _is_module(name: str) -> bool:
    """Whether a dotted compressor name is a module or package in this checkout."""
    for package, folder in SOURCES.items():
        if name == package or name.startswith(package + "."):
            path = ROOT.joinpath(folder, *name[len(package) + 1 :].split("."))
            return path.with_suffix(".py").is_file() or path.is_dir()
    return False


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _where(file: Path, line: int) -> str:
    return f"{file.relative_to(ROOT).as_posix()}:{line}"


def built_in_violations() -> list[str]:
    found = []
    for folder in ("passes", "plugins"):
        for file in _files(folder):
            for line, module, written, _ in _imports(file):
                if not _within(module, ("compressor",)) or _within(module, BUILT_IN_ALLOWED):
                    continue
                found.append(
                    f"{_where(file, line)}: `{written}` imports {module}; a built-in imports the "
                    f"core only through compressor.api (allowed: {', '.join(BUILT_IN_ALLOWED)})"
                )
    return found


def plugin_to_pass_violations() -> list[str]:
    return _imports_of(
        "plugins",
        ("compressor.passes",),
        "plugins never import passes (passes may import plugins: move what both need into "
        "plugins/)",
    )


def core_violations() -> list[str]:
    return _imports_of(
        "compressor",
        ("compressor.passes", "compressor.plugins"),
        "the core imports no built-in plugin or pass (reach them through the registry)",
    )


def _imports_of(folder: str, packages: tuple[str, ...], rule: str) -> list[str]:
    """Every import in `folder` of a module in `packages`, with the rule it breaks."""
    return [
        f"{_where(file, line)}: `{written}` imports {module}; {rule}"
        for file in _files(folder)
        for line, module, written, _ in _imports(file)
        if _within(module, packages)
    ]


def core_cycles() -> list[str]:
    """Import cycles among the core's modules (counting imports in functions and under
    TYPE_CHECKING): each as the chain of imports that closes it."""
    modules = {_module(file): file for file in _files("compressor")}
    edges = {
        name: sorted({m for _, m, _, _ in _imports(file) if m in modules and m != name})
        for name, file in modules.items()
    }
    cycles, state = [], dict.fromkeys(modules, 0)  # 0 unseen, 1 on the path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in edges[name]:
            if state[other] == 1:
                cycles.append(" -> ".join([*path[path.index(other) :], other]))
            elif state[other] == 0:
                visit(other, [*path, other])
        state[name] = 2

    for name in modules:
        if state[name] == 0:
            visit(name, [name])
    return [f"import cycle: {c} (data and imports flow one way)" for c in cycles]


def _module(file: Path) -> str:
    package = _package(file)
    return package if file.stem == "__init__" else f"{package}.{file.stem}"


@pytest.mark.parametrize(
    "check",
    [built_in_violations, plugin_to_pass_violations, core_violations, core_cycles],
    ids=lambda f: f.__name__,
)
def test_layering(check):
    problems = check()
    assert not problems, "\n".join(problems)
