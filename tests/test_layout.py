"""The pipeline in the tree: stage packages whose imports point one way (issue 15).

Every import in the package (module level and inside functions) is read from the source and
must go to the same stage or an earlier one:

    ops, _ext  <-  data, outputs, models  <-  profile  <-  prune  <-  evaluate  <-  commands, cli

Inside the package a name is imported from the module that defines it, never from the root
(``from entrodrop_fast import entropy`` hides which stage it comes from); only ``__version__``.
"""

import ast
import importlib
from pathlib import Path

import entrodrop_fast

PKG = Path(entrodrop_fast.__file__).parent
STAGES = {
    "ops": 0,
    "_ext": 0,
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


def _imports(path: Path):
    """(line, imported module) for every import of the package in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("entrodrop_fast"):
                    yield node.lineno, a.name
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("entrodrop_fast")
            and node.level == 0
        ):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if importlib.util.find_spec(node.module) is not None and _is_module(full):
                    yield node.lineno, full
                elif node.module == "entrodrop_fast":
                    if a.name == "_C":  # the compiled extension (a module, when it is built)
                        yield node.lineno, "entrodrop_fast._C"
                    elif a.name != "__version__":
                        yield node.lineno, f"the package root ({a.name})"
                else:
                    yield node.lineno, node.module


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


def test_architecture_knowledge_stays_in_the_adapter_table():
    # what differs between model families lives in models/ (the adapter table); elsewhere code
    # asks the adapter, never tests the model type itself
    import re

    pattern = re.compile(
        r"model_type\s*(==|!=|\bin\b|\bnot in\b)|\.get\(\s*(adapter\.)?model_type\b"
    )
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
