"""src/entrodrop_fast/_C.pyi against the built extension: every function and constant of
entrodrop_fast._C is in the stub and vice versa (the cuda_* ones when built WITH_CUDA), with
the parameter names (or, for positional-only functions, the parameter count) pybind11 reports."""

import ast
import pathlib
import re

import pytest

from entrodrop_fast import _ext

STUB = pathlib.Path(__file__).resolve().parents[1] / "src" / "entrodrop_fast" / "_C.pyi"


def _stub():
    """({function: (parameter names, positional-only)}, {constant names})."""
    tree = ast.parse(STUB.read_text())
    funcs, consts = {}, set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            a = node.args
            funcs[node.name] = ([p.arg for p in a.posonlyargs + a.args], bool(a.posonlyargs))
        elif (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and not node.target.id.startswith("_")
        ):
            consts.add(node.target.id)
    return funcs, consts


def _split_top(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [p for p in [*out, cur.strip()] if p]


def _pybind_params(fn) -> list[str]:
    first = (fn.__doc__ or "").splitlines()[0]
    m = re.match(rf"^{fn.__name__}\((.*)\) -> ", first)
    assert m, f"unexpected pybind11 signature line: {first!r}"
    return [p.split(":")[0].strip() for p in _split_top(m.group(1))]


@pytest.fixture(scope="module")
def C():
    return _ext.require()


def test_every_name_of_the_extension_is_in_the_stub_and_back(C):
    funcs, consts = _stub()
    built = {n for n in dir(C) if not n.startswith("_")}
    stub = set(funcs) | consts
    assert built - stub == set(), f"in _C but not in _C.pyi: {sorted(built - stub)}"
    expected = stub if C.WITH_CUDA else {n for n in stub if not n.lower().startswith("cuda_")}
    assert expected - built == set(), f"in _C.pyi but not in _C: {sorted(expected - built)}"
    assert {n for n in built if callable(getattr(C, n))} == {n for n in built if n in funcs}, (
        "functions vs constants"
    )


def test_parameters_match(C):
    funcs, _ = _stub()
    for name, (params, posonly) in funcs.items():
        if not hasattr(C, name):  # a cuda_* function of a CPU-only build
            continue
        got = _pybind_params(getattr(C, name))
        if posonly:  # pybind11 calls unnamed parameters arg0, arg1, ...
            assert got == [f"arg{i}" for i in range(len(params))], (
                f"{name}: {len(got)} parameters, the stub has {len(params)}"
            )
        else:
            assert got == params, f"{name}: extension {got} vs stub {params}"


def test_constants_have_the_stubs_types(C):
    _, consts = _stub()
    for name in consts:
        if hasattr(C, name):
            assert isinstance(getattr(C, name), bool if name == "WITH_CUDA" else int), name
