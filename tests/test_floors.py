"""The floors of src/loralab: nothing imports from a floor above it, no import circles, short files.

Where a new file goes (from the ground up; a module may import from its own floor and below, never
from above, function-local imports included):

- floor 0, the ground: ``config`` (training parameters, their defaults and checks), ``speed_settings``
  (the ``speed`` key's settings), ``results``
  (the result record, its writer, content hashes), ``models`` (loading models, the shape table),
  ``skeleton`` (a model built on the meta device from its config, no weights),
  ``data`` (batching and collation), ``distributed`` (the launch and collectives only),
  ``trackers`` (W&B / TensorBoard back-ends), ``checkpoint`` (saving and restoring run state),
  ``signals`` (a command's stop on SIGINT / SIGTERM).
- floor 1, the parts: ``methods/`` (one file per adapter method and its parts), ``decomposition/``
  (calibration statistics, CorDA, ASVD), ``speed/`` (kernels and graph capture), ``tasks/``
  (datasets, prompts, scorers, evaluation loops), ``engine/`` (the generation engine), ``merge``.
- floor 2: ``experiment`` (reads an experiment folder and validates it against the registries of
  floor 1: methods, tasks, decomposition options), ``init_adapter`` (reads, checks and loads the saved
  adapter a run starts from).
- floor 3: ``run/`` (the run path: build, step, loop, meter, record).
- floor 4: ``bench/``, ``report/``, ``sweep`` (drive runs or read their records).
- floor 5: ``commands/``, ``cli``, ``__main__`` (each subcommand calls one function).

A module the table does not cover fails the test: place a new file by adding it (or its package)
to ``FLOORS``. An arrow goes from the importing module to the module it names: ``from loralab.x
import y`` points at ``loralab.x.y`` when that is a module, else at ``loralab.x``; relative imports
are resolved. A circle is a strongly connected component of that graph with more than one module.
There are no exceptions besides the sandbox's length: an upward arrow is mended by moving code
down (or the importer up), never by an allowlist.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "loralab"

FLOORS = {
    # A key covers the module of that name and, for a package, every module under it; the
    # longest key wins. "loralab" (the package's own __init__: the version string) covers itself only.
    "loralab": 0,
    "loralab.config": 0,
    "loralab.speed_settings": 0,
    "loralab.results": 0,
    "loralab.models": 0,
    "loralab.shapes": 0,
    "loralab.skeleton": 0,
    "loralab.data": 0,
    "loralab.distributed": 0,
    "loralab.trackers": 0,
    "loralab.checkpoint": 0,
    "loralab.signals": 0,
    "loralab.methods": 1,
    "loralab.decomposition": 1,
    "loralab.speed": 1,
    "loralab.tasks": 1,
    "loralab.engine": 1,
    "loralab.merge": 1,
    "loralab.experiment": 2,
    "loralab.init_adapter": 2,
    "loralab.run": 3,
    "loralab.bench": 4,
    "loralab.report": 4,
    "loralab.sweep": 4,
    "loralab.commands": 5,
    "loralab.cli": 5,
    "loralab.__main__": 5,
}

MAX_LINES = 400
LONG_ALLOWED = {"tasks/sandbox.py"}  # the sandbox's seccomp/rlimit set-up reads best in one file
def module_name(path: Path) -> str:
    """``src/loralab/a/b.py`` -> ``loralab.a.b``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def floor_of(module: str) -> int | None:
    """The floor of ``module`` (longest covering key of FLOORS), None if uncovered."""
    table = FLOORS
    best = None
    for key in table:
        covers = module == key or (key != "loralab" and module.startswith(key + "."))
        if covers and (best is None or len(key) > len(best)):
            best = key
    return None if best is None else table[best]


def imports(source: str, name: str, is_package: bool, modules) -> list[tuple[int, str]]:
    """The loralab modules that ``source`` (module ``name``) imports, anywhere in it: (line, imported)."""
    package = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            source_module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source_module = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{source_module}.{a.name}" if f"{source_module}.{a.name}" in modules else source_module
                       for a in node.names]
        out += [(node.lineno, t) for t in targets if (t == "loralab" or t.startswith("loralab.")) and t != name]
    return out


@functools.cache
def arrows() -> list[tuple[str, int, str, str]]:
    """Every loralab import of every module: (file, line, importer, imported)."""
    modules = all_modules()
    return [(str(path.relative_to(SRC.parent)), line, name, imported)
            for name, path in modules.items()
            for line, imported in imports(path.read_text(), name, path.name == "__init__.py", modules)]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (iterative: no recursion limit)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
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
                components.append(sorted(component))
    return components


def test_every_module_has_a_floor():
    uncovered = [name for name in all_modules() if floor_of(name) is None]
    assert not uncovered, f"modules without a floor (add them to FLOORS in {Path(__file__).name}): {uncovered}"


def test_no_import_points_to_a_floor_above():
    upward = []
    for file, line, importer, imported in arrows():
        low, high = floor_of(importer), floor_of(imported)
        if None not in (low, high) and high > low:
            upward.append(f"{file}:{line}: {importer} (floor {low}) -> {imported} (floor {high})")
    assert not upward, "imports from a floor above:\n" + "\n".join(upward)


def test_no_import_circles():
    modules = all_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for _, _, importer, imported in arrows():
        if imported in modules:
            graph[importer].add(imported)
    circles = [c for c in strongly_connected(graph) if len(c) > 1]
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_no_long_files():
    long = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and rel not in LONG_ALLOWED:
            long[rel] = lines
    assert not long, f"files over {MAX_LINES} lines (split by responsibility): {long}"


def test_the_checks_see_what_they_guard():
    """The parser finds function-local and relative imports and resolves ``from x import module``;
    the circle finder finds a circle; the table places a package's own module."""
    found = {(importer, imported) for _, _, importer, imported in arrows()}
    assert ("loralab.__main__", "loralab.cli") in found
    assert ("loralab.methods", "loralab.methods.lora") in found  # from loralab.methods import lora
    source = "def f():\n    from ..config import ConfigError\n    from . import lora, INITS\n    import loralab.run.loop\n"
    assert imports(source, "loralab.methods.x", False, {"loralab.methods.lora"}) == [
        (2, "loralab.config"), (3, "loralab.methods.lora"), (3, "loralab.methods"), (4, "loralab.run.loop")]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"], ["d"]]
    assert floor_of("loralab.methods") == 1 and floor_of("loralab.speed.fast_dora") == 1
    assert floor_of("loralab.configs") is None and floor_of("loralab.new_file") is None
