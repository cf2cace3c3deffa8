"""The pipeline in the tree: stage packages whose imports point one way (issue 15).

Every import in the package (module level and inside functions) is read from the source and
must go to the same stage or an earlier one:

    ops, _ext, _fork  <-  data, outputs, models  <-  profile  <-  prune  <-  evaluate
                                                                           <-  commands, cli

Inside the package a name is imported from the module that defines it, never from the root
(``from entrodrop_fast import entropy`` hides which stage it comes from); only ``__version__``.
"""

import ast
import importlib
import re
from pathlib import Path

import entrodrop_fast

# the source tree beside these tests (what a change edits), not the installed copy, which is
# what `import entrodrop_fast` finds after `pip install .`
_SRC = Path(__file__).resolve().parents[1] / "src" / "entrodrop_fast"
PKG = _SRC if _SRC.is_dir() else Path(entrodrop_fast.__file__).parent
STAGES = {
    "ops": 0,
    "_ext": 0,
    "_fork": 0,
    "_names": 0,
    "_C": 0,
    "data": 1,
    "outputs": 1,
    "models": 1,
    "profile": 2,
    "prune": 3,
    "evaluate": 4,
    "commands": 5,
    "cli": 5,
    "__main__": 5,
}


def _stage(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "entrodrop_fast":
        return None
    if len(parts) == 1:
        return None  # the root: resolved per name below
    return STAGES[parts[1]]


def _absolute(node: ast.ImportFrom, path: Path) -> str | None:
    """The module a ``from ... import`` names, relative imports resolved from ``path``."""
    if node.level == 0:
        return node.module
    package = ["entrodrop_fast", *path.relative_to(PKG).parts[:-1]]
    if node.level > len(package):
        return None
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path, text: str | None = None):
    """(line, imported module) for every import of the package in the file, relative ones and
    ``importlib.import_module("entrodrop_fast....")`` calls with a literal name included."""
    tree = ast.parse(path.read_text() if text is None else text, filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("entrodrop_fast"):
                    yield node.lineno, a.name
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and str(node.args[0].value).startswith("entrodrop_fast.")
        ):
            yield node.lineno, node.args[0].value
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, path)
            if not (module and module.startswith("entrodrop_fast")):
                continue
            for a in node.names:
                full = f"{module}.{a.name}"
                if _is_module(module) and _is_module(full):
                    yield node.lineno, full
                elif module == "entrodrop_fast":
                    if a.name == "_C":  # the compiled extension (a module, when it is built)
                        yield node.lineno, "entrodrop_fast._C"
                    elif a.name != "__version__":
                        yield node.lineno, f"the package root ({a.name})"
                else:
                    yield node.lineno, module


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def test_stage_packages_import_one_way():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "__init__.py":
            continue  # the root re-exports the public API of every stage
        here = STAGES[rel.parts[0].removesuffix(".py")]
        for line, mod in _imports(path):
            if mod.startswith("the package root"):
                bad.append(
                    f"{rel}:{line} imports {mod[len('the package root ') :]} from the package "
                    "root; import it from its module"
                )
                continue
            there = _stage(mod)
            if there is not None and there > here:
                bad.append(f"{rel}:{line} imports {mod} (a later stage)")
    assert not bad, "imports against the pipeline's direction:\n  " + "\n  ".join(bad)


def test_every_top_level_entry_is_a_stage():
    # a new top-level module must be placed in the pipeline (STAGES) rather than beside it
    names = {
        p.name.removesuffix(".py")
        for p in PKG.iterdir()
        if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file()))
        and p.name != "__init__.py"
    }
    assert names <= set(STAGES), (
        f"top-level modules outside the pipeline's stages: {sorted(names - set(STAGES))}"
    )


def test_cli_help_lists_the_subcommands_in_pipeline_order():
    from entrodrop_fast.cli import build_parser

    text = build_parser().format_help()
    pos = [text.index(f"\n    {name} ") for name in ("profile", "rank", "prune", "eval", "compare")]
    assert pos == sorted(pos), text


# a test of the model type: `model_type == ...`, `cfg["model_type"] in ...`,
# `cfg.get("model_type") != ...`, `getattr(c, "model_type") == ...`, `.model_type.startswith(`,
# or a table looked up by it (`.get(model_type`)
ARCH_TEST = re.compile(
    r"model_type\b['\"]?\s*[\])]?\s*(==|!=|\bin\b|\bnot in\b)"
    r"|model_type\s*\.\s*(startswith|endswith)\("
    r"|\.get\(\s*(adapter\.)?model_type\b"
)


def test_the_checks_see_every_form():
    # relative imports and importlib calls count as imports; every spelling of a model-type test
    # counts as one
    fake = PKG / "profile" / "example.py"
    text = (
        "from ..evaluate import compare\n"
        "from . import taps\n"
        "import importlib\n"
        "importlib.import_module('entrodrop_fast.prune.surgery')\n"
    )
    found = [m for _, m in _imports(fake, text)]
    assert "entrodrop_fast.evaluate.compare" in found
    assert "entrodrop_fast.profile.taps" in found
    assert "entrodrop_fast.prune.surgery" in found
    for line in (
        'if cfg.get("model_type") == "qwen2":',
        'if cfg["model_type"] in ("llama",):',
        'if getattr(c, "model_type") != "x":',
        "if config.model_type.startswith('qwen'):",
        "if model_type == 'llama':",
        "rule = RULES.get(adapter.model_type)",
    ):
        assert ARCH_TEST.search(line), line
    assert not ARCH_TEST.search("identity = config.model_type")


def test_architecture_knowledge_stays_in_the_adapter_table():
    # what differs between model families lives in models/ (the adapter table); elsewhere code
    # asks the adapter, never tests the model type itself

    pattern = ARCH_TEST
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "models":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                bad.append(f"{rel}:{i}: {line.strip()}")
    assert not bad, (
        "architecture tests outside models/ (move them into the adapter table):\n  "
        + "\n  ".join(bad)
    )


TESTS = Path(__file__).parent


def test_test_files_import_shared_helpers_from_helpers_only():
    # what test files share lives in tests/helpers.py; conftest.py holds fixtures, hooks and
    # environment setup. Lines are read as text, so the code a test runs in a child process
    # (a string) is checked too.
    import re

    pattern = re.compile(
        r"^\s*(from\s+(conftest|test_\w*)\s+import\b|import\s+(conftest|test_\w*)\b)"
    )
    bad = []
    for path in sorted(TESTS.glob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.match(line):
                bad.append(f"{path.name}:{i}: {line.strip()}")
    assert not bad, (
        "test files importing conftest or a test file (import from helpers instead):\n  "
        + "\n  ".join(bad)
    )
