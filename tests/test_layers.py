"""Dependencies point one way: slides → features → survival / slide LLM → VQA → serve.

Every import of a slidevl module is read from the source (``import slidevl.x``,
``from slidevl.x import y``, relative imports, and lazy imports inside functions), so a
dependency hidden in a function body counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import slidevl

PACKAGE = Path(slidevl.__file__).resolve().parent

#: The parts of slidevl, lowest layer first. A module may import its own part and the
#: parts of lower layers; parts of one layer never import each other. The first layer
#: is the foundation every part may use (files, errors, configs, the CLI's error
#: reporting, process ranks, the LLM client, the QA record format); its modules may
#: import one another, but no two of them both ways.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"slidevl", "atomic", "errors", "config", "cli_config", "cli_errors", "registry", "cpus", "ranks",
               "interrupts", "splits", "llmclient", "qa"}),
    frozenset({"tiling"}),
    frozenset({"slide"}),
    frozenset({"synth"}),
    frozenset({"features"}),
    frozenset({"survival", "slidellm"}),
    frozenset({"vqa"}),
    frozenset({"serve"}),
    frozenset({"demo", "cli"}),
    frozenset({"__main__"}),
)
FOUNDATION = LAYERS[0]

#: Modules of one part that import each other on purpose, one side lazily inside a function.
DELIBERATE_CYCLES = {
    # The auto-selection times the dispatcher it selects for.
    frozenset({"slidevl.slidellm.encoder.attention", "slidevl.slidellm.encoder.autoselect"}),
    # The executors run the pipeline's per-slide step; the pipeline runs locally by default.
    frozenset({"slidevl.features.executors", "slidevl.features.pipeline"}),
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. slidevl.vqa.build
    target: str  # imported module, e.g. slidevl.qa.records
    where: str  # file:line of the import statement

    def __str__(self) -> str:
        return f"{self.where}: {self.source} imports {self.target}"


def _module_name(path: Path) -> str:
    parts = ("slidevl", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports() -> list[Import]:
    found = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                # `from slidevl.x import y` imports the module slidevl.x.y when there is one.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
            else:
                continue
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            found += [Import(module, t, where) for t in dict.fromkeys(targets) if t.split(".")[0] == "slidevl"]
    return found


IMPORTS = _imports()


def part(module: str) -> str:
    """``slidevl.vqa.build`` -> ``vqa``; the package itself is ``slidevl``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer(name: str) -> int:
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise AssertionError(f"slidevl.{name} is in no layer of tests/test_layers.py: add it where it belongs")


def test_the_parser_sees_every_kind_of_import() -> None:
    imports = {(i.source, i.target) for i in IMPORTS}
    # A relative import, a lazy import inside a function, and `from slidevl import name`.
    assert ("slidevl.synth.cohort", "slidevl.atomic") in imports
    assert ("slidevl.vqa.cli", "slidevl.vqa.predict") in imports
    assert ("slidevl.features.importer", "slidevl") in imports
    assert all(i.target in MODULES for i in IMPORTS), [str(i) for i in IMPORTS if i.target not in MODULES]


def test_every_part_has_a_layer() -> None:
    for module in MODULES:
        layer(part(module))


def test_no_two_parts_import_each_other() -> None:
    between: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in IMPORTS:
        a, b = part(imp.source), part(imp.target)
        if a != b:
            between[(a, b)].append(imp)
    both_ways = [
        f"{a} <-> {b}: {between[(a, b)][0]}; {between[(b, a)][0]}"
        for (a, b) in sorted(between)
        if a < b and (b, a) in between
    ]
    assert not both_ways, "parts that import each other:\n" + "\n".join(both_ways)


def test_parts_import_only_lower_layers() -> None:
    wrong = []
    for imp in IMPORTS:
        a, b = part(imp.source), part(imp.target)
        if a == b or (a in FOUNDATION and b in FOUNDATION):
            continue
        if layer(b) >= layer(a):
            wrong.append(f"{imp} ({b} is not below {a})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_two_modules_import_each_other() -> None:
    edges = {(i.source, i.target): i for i in IMPORTS if i.source != i.target}
    cycles = {frozenset(pair): (imp, edges[(pair[1], pair[0])]) for pair, imp in edges.items() if (pair[1], pair[0]) in edges}
    unexpected = [f"{a}\n  {b}" for pair, (a, b) in cycles.items() if pair not in DELIBERATE_CYCLES]
    assert not unexpected, "modules that import each other:\n" + "\n".join(unexpected)
    # Each allowed cycle must still exist: a broken one is removed from the list.
    assert DELIBERATE_CYCLES <= set(cycles), DELIBERATE_CYCLES - set(cycles)
