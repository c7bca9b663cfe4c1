"""The package layout, checked statically (issue 17): no import cycle, no import hidden inside a
function except of an optional or heavy dependency, no module over 500 lines, no function over 80.

Every check reads the source of ``jaxgrad/`` with :mod:`ast`; no jaxgrad module is imported, so
the file runs in a fraction of a second and cannot be fooled by what an import happens to execute.
``JAXGRAD_LAYOUT_ROOT`` points the checks at another copy of the package directory (used to show
that each check fails on a planted violation).

The rules:

* **No import cycle.** The graph has an edge A -> B when module A imports jaxgrad module B, and
  A -> P for each package P above B that is not a package above A: importing ``jaxgrad.x.y``
  first runs ``jaxgrad/x/__init__.py``, while a module's own packages are already being imported
  when it runs (an edge from each submodule to its own package would make every package that
  re-exports its submodules, ``data`` and ``models`` today, a cycle by construction). A module that
  imports a name from its own package's ``__init__`` does depend on it, and gets the edge.
  Imports under ``if TYPE_CHECKING:`` do not run and are skipped. Cycles are the strongly
  connected components of more than one module (Tarjan). They are checked twice: over module-level
  imports (what ``import jaxgrad.x`` executes), and over all imports including those inside
  functions, since hiding an import in a function only postpones a cycle to call time.
* **No function-local imports**, except of the optional or heavy dependencies in
  ``OPTIONAL_DEPENDENCIES`` (``import jaxgrad`` must stay light, and the jitted core must run on
  machines without them). Anything else, jaxgrad's own modules included, goes at the top of the
  module; if that makes a cycle, the shared code moves down the method.
* **No module over ``MAX_MODULE_LINES`` lines, no function or method (nested ones included) over
  ``MAX_FUNCTION_LINES``** (``def`` line to last line, decorators excluded).

* **Imports point one way, down the method** (``METHOD_ORDER``): the bottom layer (``config``,
  ``rundir``, ``common``), then ``data``, ``models``, ``train``, ``gradients``, ``groups``,
  ``estimate``, ``select``, ``pipeline``; a module imports only from its own rank or below.

The allow-lists that held the debt these rules found when they were written (issue 17) have been
paid off and removed: every rule holds with no exception.
"""

from __future__ import annotations

import ast
import functools
import os
import pathlib
import sys
from typing import NamedTuple

from helpers import REPO

ROOT = pathlib.Path(
    os.environ.get("JAXGRAD_LAYOUT_ROOT") or pathlib.Path(REPO) / "jaxgrad"
).resolve()

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

# Dependencies a function may import when it needs them (prefix match on the dotted name). Each is
# either an optional extra, or slow to import (hundreds of milliseconds to seconds, or it pulls in
# a UI/back-end stack) and needed only by one loader, reader, plot or entry point, so importing it
# at module level would make `import jaxgrad` heavy (its docstring promises jax, flax, numpy only):
#   tqdm            tqdm.auto probes IPython / ipywidgets to pick a notebook bar
#   matplotlib      plots in the report only
#   scipy, sklearn  statistics / clustering helpers of single functions (scipy.stats, .cluster)
#   datasets, pyarrow, pandas   file readers of data.sources (parquet, pickle, HF datasets)
#   tokenizers, transformers, safetensors, huggingface_hub   model and tokenizer loading
#   gguf, torch, accelerate, peft   the [gguf] extra / torch-side tools, optional
#   absl, ml_collections   command-line entry points only (stage scripts, flags)
#   orbax           checkpointing (pulls in tensorstore and friends)
#   jax.experimental.pallas   Triton / Mosaic kernel back-ends, platform-specific and heavy
#   IPython         notebook-only helpers
# NOT listed, on purpose: jax, flax, optax, numpy and the standard library (already imported or
# cheap), and jax.experimental.multihost_utils, which imports only jax internals that `import jax`
# has already loaded (no back-end start-up; jaxgrad.common.distributed imports it at module level).
OPTIONAL_DEPENDENCIES = (
    "tqdm", "matplotlib", "scipy", "sklearn", "datasets", "pyarrow", "pandas", "tokenizers",
    "transformers", "safetensors", "huggingface_hub", "gguf", "torch", "accelerate", "peft",
    "absl", "ml_collections", "orbax", "jax.experimental.pallas", "IPython",
)

ADVICE = "(issue 17; plan: docs/dev/layout_plan.md)"

# ---------------------------------------------------------------------------------------------
# Reading the source
# ---------------------------------------------------------------------------------------------


class Import(NamedTuple):
    module: str        # the importing jaxgrad module
    target: str        # the imported module, resolved ("jaxgrad.data.sources", "scipy.stats")
    spelled: tuple[str, ...]  # "base.name" for each name of a `from base import name`
    line: int
    function: str | None  # qualified name of the enclosing function; None at module level
    text: str          # the statement, as written


class Function(NamedTuple):
    module: str
    qualname: str      # as Python's __qualname__: "Class.method", "outer.<locals>.inner"
    line: int
    length: int


def _module_name(path: pathlib.Path) -> str:
    parts = ("jaxgrad",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _rel(path: pathlib.Path) -> str:
    return str(pathlib.Path("jaxgrad") / path.relative_to(ROOT))


@functools.lru_cache(maxsize=None)
def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


@functools.lru_cache(maxsize=None)
def _source(name: str) -> tuple[str, ast.Module]:
    text = _modules()[name].read_text(encoding="utf-8")
    return text, ast.parse(text, filename=str(_modules()[name]))


@functools.lru_cache(maxsize=None)
def _is_external_module(dotted: str) -> bool:
    """Whether ``dotted`` names a module of an installed package (file system only, no import)."""
    *parents, last = dotted.split(".")
    for entry in sys.path:
        base = pathlib.Path(entry or ".").joinpath(*parents)
        if (base / f"{last}.py").is_file() or (base / last).is_dir():
            return True
        if base.is_dir() and (any(base.glob(f"{last}.*.so")) or any(base.glob(f"{last}.*.pyd"))):
            return True
    return False


def _is_type_checking(test: ast.expr) -> bool:
    return ast.unparse(test).split(".")[-1] == "TYPE_CHECKING"


def _resolve_from(name: str, node: ast.ImportFrom) -> str:
    base = node.module or ""
    if node.level:  # relative import, from the package that contains `name`
        pkg = name.split(".") if _modules()[name].name == "__init__.py" else name.split(".")[:-1]
        pkg = pkg[: len(pkg) - node.level + 1]
        base = ".".join(pkg + ([base] if base else []))
    return base


def _targets(name: str, node: ast.Import | ast.ImportFrom) -> dict[str, list[str]]:
    """Resolved imported module -> the names spelled "base.name" that it stands for."""
    mods = _modules()
    out: dict[str, list[str]] = {}
    if isinstance(node, ast.Import):
        for alias in node.names:
            out.setdefault(alias.name, []).append(alias.name)
        return out
    base = _resolve_from(name, node)
    for alias in node.names:
        full = f"{base}.{alias.name}"
        if base == "jaxgrad" or base.startswith("jaxgrad."):
            target = full if full in mods else base
        else:
            target = full if _is_external_module(full) else base
        out.setdefault(target, []).append(full)
    return out


def _statements(node: ast.AST) -> list[ast.stmt]:
    """The statements directly inside ``node`` (imports and defs are statements: expressions need
    no visit, which keeps the walk fast)."""
    out = []
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, field, None) or ():
            out.extend(_statements(child) if isinstance(child, (ast.excepthandler,
                                                                ast.match_case)) else [child])
    return out


@functools.lru_cache(maxsize=None)
def _imports(name: str) -> tuple[Import, ...]:
    found: list[Import] = []

    def visit(statements: list[ast.stmt], prefix: str, function: str | None) -> None:
        for child in statements:
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                text = ast.unparse(child)
                for target, spelled in _targets(name, child).items():
                    found.append(Import(name, target, tuple(spelled), child.lineno, function, text))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                visit(child.orelse, prefix, function)  # the body never runs; `else:` does
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = prefix + child.name
                visit(_statements(child), qual + ".<locals>.", qual)
            elif isinstance(child, ast.ClassDef):
                visit(_statements(child), prefix + child.name + ".", function)
            else:
                visit(_statements(child), prefix, function)

    visit(_source(name)[1].body, "", None)
    return tuple(found)


@functools.lru_cache(maxsize=None)
def _functions(name: str) -> tuple[Function, ...]:
    found: list[Function] = []

    def visit(statements: list[ast.stmt], prefix: str) -> None:
        for child in statements:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = prefix + child.name
                found.append(Function(name, qual, child.lineno,
                                      child.end_lineno - child.lineno + 1))
                visit(_statements(child), qual + ".<locals>.")
            elif isinstance(child, ast.ClassDef):
                visit(_statements(child), prefix + child.name + ".")
            else:
                visit(_statements(child), prefix)

    visit(_source(name)[1].body, "")
    return tuple(found)


def _is_internal(target: str) -> bool:
    return target == "jaxgrad" or target.startswith("jaxgrad.")


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _where(imp: Import) -> str:
    place = f"inside {imp.function}()" if imp.function else "at module level"
    text = imp.text if len(imp.text) <= 100 else imp.text[:97] + "..."
    return f"{_rel(_modules()[imp.module])}:{imp.line} {place}: `{text}`"


def _graph(with_local: bool) -> dict[str, dict[str, list[Import]]]:
    """module -> module it depends on -> the import statements that make the edge."""
    graph: dict[str, dict[str, list[Import]]] = {m: {} for m in _modules()}
    for name in _modules():
        own = set(_ancestors(name)) | {name}
        for imp in _imports(name):
            if not _is_internal(imp.target) or (imp.function and not with_local):
                continue
            implied = [p for p in _ancestors(imp.target) if p not in own]
            for dep in [imp.target, *implied]:
                if dep != name and dep in graph:
                    graph[name].setdefault(dep, []).append(imp)
    return graph


def _cycles(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
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
                    work.append((child, iter(sorted(graph[child]))))
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
                    out.append(sorted(component))
    return sorted(out)


def _fail(problems: list[str], title: str) -> None:
    if problems:
        raise AssertionError(f"{title}:\n\n" + "\n\n".join(problems))


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


def _check_cycles(with_local: bool) -> None:
    graph = _graph(with_local)
    kind = "imports (module-level and inside functions)" if with_local else "module-level imports"
    problems = []
    for members in _cycles(graph):
        edges = [f"    {a} -> {b}: " + "; ".join(_where(i) for i in graph[a][b])
                 for a in members for b in sorted(graph[a]) if b in members]
        problems.append(
            f"import cycle among {', '.join(members)} through {kind}:\n" + "\n".join(edges)
            + "\n  Make imports point one way, down the method (data, models, train, gradients, "
            "groups, estimate, select, pipeline): move the code both sides need into the lower module "
            f"(or a common one), and do not hide the import inside a function {ADVICE}.")
    _fail(problems, f"import cycles in {ROOT}")


def test_no_import_cycle():
    """Module-level imports form no cycle (what `import jaxgrad.x` runs)."""
    _check_cycles(False)


def test_no_import_cycle_through_function_local_imports():
    """Counting the imports hidden inside functions too (they run at call time), no cycle."""
    _check_cycles(True)


def _is_optional(imp: Import) -> bool:
    return any(n == p or n.startswith(p + ".")
               for n in (imp.target, *imp.spelled) for p in OPTIONAL_DEPENDENCIES)


def test_no_function_local_imports_except_optional_dependencies():
    problems = [
        f"{_where(imp)}: {imp.module} imports {imp.target} inside a function. Move the import to "
        f"the top of the module (if that makes a cycle, move the shared code down the method "
        f"instead). Only the optional or heavy dependencies of OPTIONAL_DEPENDENCIES may be "
        f"imported inside a function {ADVICE}."
        for name in _modules() for imp in _imports(name)
        if imp.function and not _is_optional(imp)]
    _fail(problems, f"function-local imports in {ROOT}")


def _check_sizes(sizes: dict[str, tuple[int, str]], limit: int, what: str, fix: str) -> list[str]:
    return [f"{where}: {what} {key} is {size} lines, over the limit of {limit}. {fix} {ADVICE}."
            for key, (size, where) in sorted(sizes.items()) if size > limit]


def test_module_sizes():
    sizes = {}
    for name, path in _modules().items():
        sizes[name] = (len(_source(name)[0].splitlines()), _rel(path))
    _fail(_check_sizes(
        sizes, MAX_MODULE_LINES, "module",
        "Split it into modules of one concern each, in the package of its stage of the method"),
        f"modules over {MAX_MODULE_LINES} lines in {ROOT}")


def test_function_sizes():
    sizes: dict[str, tuple[int, str]] = {}
    for name, path in _modules().items():
        for fn in _functions(name):
            key = f"{name}:{fn.qualname}"
            if fn.length >= sizes.get(key, (0, ""))[0]:
                sizes[key] = (fn.length, f"{_rel(path)}:{fn.line}")
    _fail(_check_sizes(
        sizes, MAX_FUNCTION_LINES, "function",
        "Split it into named steps (e.g. set-up, loop body, write-out), each a function of its "
        "own"), f"functions over {MAX_FUNCTION_LINES} lines in {ROOT}")


# The packages in the order of the method (plan §2.1): a module imports only from its own rank or
# below. Rank 0 is the bottom layer: the one source of defaults, the run directory's paths and the
# helpers with no step of the method in them, which every stage may import. jaxgrad/__init__.py
# (lazy re-exports) and jaxgrad/_compat.py (old paths, resolved on use) stand outside the order.
METHOD_ORDER = (
    ("jaxgrad.config", "jaxgrad.rundir", "jaxgrad.common"),
    ("jaxgrad.data",),
    ("jaxgrad.models",),
    ("jaxgrad.train",),
    ("jaxgrad.gradients",),
    ("jaxgrad.groups",),
    ("jaxgrad.estimate",),
    ("jaxgrad.select",),
    ("jaxgrad.pipeline",),
)
OUTSIDE_THE_ORDER = ("jaxgrad", "jaxgrad._compat")


def _rank(module: str) -> int | None:
    for rank, prefixes in enumerate(METHOD_ORDER):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def test_every_module_has_a_place_in_the_method_order():
    missing = [f"{name}: in no package of METHOD_ORDER; put it in the package of its step of the "
               f"method (or the bottom layer) {ADVICE}."
               for name in _modules() if name not in OUTSIDE_THE_ORDER and _rank(name) is None]
    _fail(missing, f"modules outside the method order in {ROOT}")


def test_imports_point_down_the_method():
    problems = []
    for name in _modules():
        rank = _rank(name)
        for imp in _imports(name) if rank is not None else ():
            target = _rank(imp.target) if _is_internal(imp.target) else None
            if target is not None and target > rank:
                problems.append(
                    f"{_where(imp)}: {name} ({', '.join(METHOD_ORDER[rank])}) imports "
                    f"{imp.target}, which comes later in the method "
                    f"({', '.join(METHOD_ORDER[target])}); move the code it needs down to "
                    f"{name}'s package or below {ADVICE}.")
    _fail(problems, f"imports against the method order in {ROOT}")


def _moved() -> dict[str, dict[str, str]]:
    """``jaxgrad._compat.MOVED`` read from the source (old module -> {old name: new home})."""
    tree = _source("jaxgrad._compat")[1]
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "MOVED" for t in targets):
                return ast.literal_eval(node.value)
    return {}


def test_jaxgrad_imports_only_the_new_paths():
    """jaxgrad's own modules import modules that exist and names from where they are defined,
    never an old path that jaxgrad._compat serves for users (with a DeprecationWarning, which
    the suite's warning filter would hide): such an import could also hide an upward import
    (``jaxgrad.fidelity`` is ``jaxgrad.pipeline``'s)."""
    modules, moved = set(_modules()), _moved()
    problems = []
    for name in _modules():
        if name == "jaxgrad._compat":
            continue
        for imp in _imports(name):
            if not _is_internal(imp.target):
                continue
            if imp.target not in modules:
                problems.append(f"{_where(imp)}: {imp.target} is not a module of jaxgrad "
                                f"(an old path? jaxgrad/_compat.py MOVED gives the new one) "
                                f"{ADVICE}.")
            for spelled in imp.spelled:
                base, _, attr = spelled.rpartition(".")
                if attr in moved.get(base, {}):
                    problems.append(f"{_where(imp)}: {spelled} is an old path; import it from "
                                    f"{moved[base][attr].partition(':')[0]} {ADVICE}.")
    _fail(problems, f"imports of old paths in {ROOT}")
