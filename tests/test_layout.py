"""The package layout holds: imports flow one way (no cycles, lower layers never import higher ones), no module is
over ~450 lines, ``import hf_deltacome`` and ``deltacome --help`` import nothing heavy, and the CLI's stated
defaults are the library's."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hf_deltacome"
MAX_LINES = 450
LONG_ALLOWED = {"kernels/triton_delta.py"}  # one Triton kernel file, kept whole (docs/ARCHITECTURE.md)

# layer of each top-level part; a module may import only from its own layer or lower ones
LAYERS = {
    "errors": 0, "progress": 0, "lazy": 0,
    "format": 1, "io.atomic": 1, "io.weight_sketch": 1, "linears": 1,
    "quant": 2, "config": 2, "io.fingerprint": 2,
    "backend": 3, "io.adapter_files": 3, "io.adapter_source": 3, "io.summary": 3, "io.shards": 3, "kernels": 3,
    "layer": 4, "card": 4, "model": 5, "hub": 5,
    "compression": 6, "io.saving": 6,
    "multimodal": 7, "evaluation": 8, "loading": 8, "integration": 9, "serving": 9, "amlq": 9,
    "cli": 10, "__init__": 10, "bootstrap": 10,  # the import watcher triggers integration.install()
}  # fmt: skip


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"] or ["__init__"]
        out[".".join(parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        out["kernels" + ("" if path.stem == "__init__" else "." + path.stem)] = path
    return out


def _layer(module: str) -> int:
    for key in sorted(LAYERS, key=len, reverse=True):
        if module == key or module.startswith(key + "."):
            return LAYERS[key]
    raise AssertionError(f"hf_deltacome.{module} belongs to no layer of tests/test_layout.py's LAYERS")


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``module`` imports anywhere in its body (function-level imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg and module != "__init__" else module.split(".")[:-1]
    if module == "__init__":
        base = []
    found = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(anchor + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("hf_deltacome"):
                target = node.module[len("hf_deltacome") :].lstrip(".")
            else:
                continue
            names = [f"{target}.{a.name}".strip(".") if f"{target}.{a.name}".strip(".") in known else target
                     for a in node.names]  # fmt: skip
        elif isinstance(node, ast.Import):
            names = [a.name[len("hf_deltacome") :].lstrip(".") for a in node.names if a.name.startswith("hf_deltacome.")]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def test_imports_flow_one_way():
    mods = _modules()
    known = set(mods)
    graph = {m: _imports(m, p, known) for m, p in mods.items()}
    upward = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in graph.items()
        for d in deps
        if _layer(d) > _layer(m) and not m.startswith(d + ".")  # a package's modules may use its __init__'s names
    ]
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))
    # no cycles at all (also within one layer)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_is_too_long():
    long = []
    for path in list(PACKAGE.rglob("*.py")) + list((ROOT / "kernels").glob("*.py")):
        rel = str(path.relative_to(ROOT))
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and rel not in LONG_ALLOWED:
            long.append(f"{rel}: {n} lines")
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("code", ["import hf_deltacome", "from hf_deltacome.cli import build_parser; build_parser()"])
def test_light_imports(code):
    """The package import and the CLI parser load neither torch nor transformers nor PEFT."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_cli_defaults_are_the_library_defaults():
    from hf_deltacome.cli import DTYPES, METHODS, build_parser
    from hf_deltacome.config import METHODS as CONFIG_METHODS
    from hf_deltacome.config import DeltaCoMeConfig, parse_ratio
    from hf_deltacome.loading import DTYPES as LOADING_DTYPES

    defaults = DeltaCoMeConfig()
    args = build_parser().parse_args(["compress", "--base", "b", "--finetuned", "f", "--output", "o"])
    assert parse_ratio(args.ratio) == defaults.ratio
    assert (args.method, args.group_size, args.quantizer, args.damp, args.act_order) == (
        defaults.method, defaults.group_size, defaults.quantizer, defaults.damp, defaults.act_order,
    )  # fmt: skip
    assert METHODS == CONFIG_METHODS and DTYPES == LOADING_DTYPES
    for action in build_parser()._subparsers._group_actions[0].choices["compress"]._actions:
        assert action.help, f"--{action.dest} has no help text"


def test_every_subpackage_is_packaged():
    """A non-editable install ships every subpackage (pyproject's explicit list)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"hf_deltacome." + ".".join(p.parent.relative_to(PACKAGE).parts) for p in PACKAGE.rglob("__init__.py")}
    found = {f.rstrip(".") for f in found} | {"hf_deltacome.kernels", "hf_deltacome.model_cards"}
    assert found <= listed, f"missing from pyproject's packages: {sorted(found - listed)}"


def test_no_script_folder_shadows_a_package_transformers_imports():
    """Scripts run as ``python benchmarks/x.py`` put their folder first on ``sys.path``; a ``kernels.py`` there was
    imported by transformers' probe for Hugging Face's ``kernels`` package and switched the backend to the Triton
    interpreter for the whole benchmark."""
    probed = {"kernels", "triton", "peft", "transformers", "accelerate", "safetensors", "torch", "huggingface_hub"}
    for folder in ("benchmarks", "examples", "scripts"):
        names = {p.stem for p in (ROOT / folder).glob("*.py")} | {p.name for p in (ROOT / folder).iterdir() if p.is_dir()}
        assert not names & probed, (folder, names & probed)
