"""The shape of the import graph, checked on every run: no circles, layers import downward only,
no module reaches into another's private names, and function-local imports of our own modules
only where they keep a heavy or optional dependency out of a path that must not load it.

The graph is read from the source (``ast``), module-level and function-level imports alike,
``if TYPE_CHECKING`` blocks included: an import circle hidden inside a function is still one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pyimgano_core", "pyimgano_cli")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path):
    """(target module, imported names, line, inside a function) for each import of our own modules."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = pkg
            for _ in range(max(node.level - 1, 0)):
                base = base.rsplit(".", 1)[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            names = [a.name for a in node.names]
            # "from . import x" / "from .pkg import module": the module itself is the target
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            for t in subs or ([target] if target in MODULES else []):
                yield t, ([] if subs else names), node.lineno, id(node) in local
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    yield a.name, [], node.lineno, id(node) in local


EDGES = {m: [e for e in _imports(m, p) if e[0] != m] for m, p in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: {t for t, *_ in es if not (m.startswith(t + ".") and t in MODULES)} for m, es in EDGES.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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


def test_no_import_circles():
    assert _cycles() == []


# (importer prefix, forbidden target prefixes): a lower layer never imports a higher one.
HIGHER = ("pyimgano_core.engine", "pyimgano_core.runs", "pyimgano_core.shards", "pyimgano_core.sweep",
          "pyimgano_core.infer", "pyimgano_core.model", "pyimgano_core.config", "pyimgano_core.outputs",
          "pyimgano_core.deploy", "pyimgano_core.serve")
CONTRACTS = [
    ("pyimgano_core", ("pyimgano_cli",)),
    ("pyimgano_core.errors", ("pyimgano_core.",)),
    ("pyimgano_core.legacy", ("pyimgano_core.",)),
    ("pyimgano_core.metrics", ("pyimgano_core.data", "pyimgano_core.features", "pyimgano_core.detectors", *HIGHER)),
    ("pyimgano_core.calibration", ("pyimgano_core.features", "pyimgano_core.detectors", *HIGHER)),
    ("pyimgano_core.data", ("pyimgano_core.features", "pyimgano_core.detectors", *HIGHER)),
    ("pyimgano_core.features", ("pyimgano_core.detectors", *HIGHER)),
    ("pyimgano_core.detectors", HIGHER),
    # the writing side writes what it is given: it never scores, fits or reads a config
    ("pyimgano_core.outputs", ("pyimgano_core.detectors", "pyimgano_core.features", "pyimgano_core.engine",
                               "pyimgano_core.runs", "pyimgano_core.shards", "pyimgano_core.sweep", "pyimgano_core.config",
                               "pyimgano_core.infer", "pyimgano_core.deploy", "pyimgano_core.serve")),
    ("pyimgano_core.engine", ("pyimgano_core.runs", "pyimgano_core.shards", "pyimgano_core.sweep", "pyimgano_core.serve")),
]


@pytest.mark.parametrize("importer,forbidden", CONTRACTS, ids=[c[0] for c in CONTRACTS])
def test_layers_import_downward_only(importer, forbidden):
    bad = [f"{m}:{line} imports {t}" for m, es in EDGES.items() if m == importer or m.startswith(importer + ".")
           for t, _, line, _ in es if any(t == f or t.startswith(f if f.endswith(".") else f + ".") or t == f.rstrip(".")
                                          for f in forbidden) and not t.startswith(importer)]
    assert bad == []


def test_no_private_names_across_modules():
    bad = [f"{m}:{line} imports {t}.{n}" for m, es in EDGES.items() for t, names, line, _ in es
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert bad == []


HEAVY_PACKAGES = {"torch", "torchvision", "matplotlib", "ray", "sklearn", "faiss", "onnx", "onnxruntime", "openvino",
                  "timm", "open_clip", "anomalib", "fastapi", "uvicorn", "prometheus_client", "starlette", "scipy",
                  "typer", "rich"}


def _runtime_imports(path: Path) -> tuple[set[str], set[str]]:
    """(external top-level packages, our modules) imported when ``path`` is imported (not in functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    skip |= {id(n) for f in ast.walk(tree) if isinstance(f, ast.If) and "TYPE_CHECKING" in ast.unparse(f.test)
             for n in ast.walk(f)}
    ext = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) and id(n) not in skip for a in n.names}
    ext |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0
            and id(n) not in skip}
    return ext, skip


def _heavy() -> set[str]:
    """Our modules whose import loads a heavy package (torch, matplotlib, Ray, ...), directly or through ours."""
    direct, ours = {}, {}
    for m, p in MODULES.items():
        ext, skip = _runtime_imports(p)
        direct[m] = bool(ext & HEAVY_PACKAGES)
        tree_locals = {line for t, _, line, local in EDGES[m] if local}
        ours[m] = {t for t, _, line, local in EDGES[m] if not local}
        pkg_init = [q for q in MODULES if m.startswith(q + ".")]  # importing a submodule runs its packages' __init__
        ours[m] |= set(pkg_init)
    heavy = {m for m, d in direct.items() if d}
    changed = True
    while changed:
        changed = False
        for m, deps in ours.items():
            if m not in heavy and deps & heavy:
                heavy.add(m)
                changed = True
    return heavy


def test_function_local_imports_only_defer_heavy_modules():
    """A function-local import of our own code is for a module that loads a heavy dependency
    (torch stays out of the ONNX path and the CLI's start-up; matplotlib and Ray load when asked)."""
    heavy = _heavy()
    bad = [f"{m}:{line} imports {t} inside a function, but {t} is light: import it at the top"
           for m, es in EDGES.items() if m.startswith("pyimgano_core") for t, _, line, local in es if local and t not in heavy]
    assert bad == []
