"""The entrodrop CLI: info and entropy."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from entrodrop_fast.cli import main


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["torch"]["available"]
    assert "extension" in info


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_entropy_on_stored_tensor(tmp_path, capsys, suffix):
    x = torch.randn(64, 8)
    path = tmp_path / f"h{suffix}"
    if suffix == ".npy":
        np.save(path, x.numpy())
    elif suffix == ".pt":
        torch.save(x, path)
    else:
        save_file({"hidden": x}, str(path))
    assert (
        main(
            [
                "entropy",
                str(path),
                "--method",
                "bucket,gaussian_diag",
                "--json",
                "--backend",
                "torch",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    got = {r["method"]: r["entropy"] for r in out["results"]}
    import entrodrop_fast as ef

    assert got["bucket"] == pytest.approx(ef.bucket_entropy(x).item())
    assert got["gaussian_diag"] == pytest.approx(ef.gaussian_diag_entropy(x).item())


def test_entropy_errors(tmp_path, capsys):
    assert main(["entropy", str(tmp_path / "missing.npy")]) == 1
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "h.txt"
    bad.write_text("1 2 3")
    assert main(["entropy", str(bad)]) == 1
    assert "unsupported file type" in capsys.readouterr().err
    two = tmp_path / "two.safetensors"
    save_file({"a": torch.randn(4, 2), "b": torch.randn(4, 2)}, str(two))
    assert main(["entropy", str(two)]) == 1
    assert "--key" in capsys.readouterr().err
    nanf = tmp_path / "nan.npy"
    a = np.random.randn(10, 3).astype(np.float32)
    a[2, 2] = np.nan
    np.save(nanf, a)
    assert main(["entropy", str(nanf)]) == 1
    assert "NaN" in capsys.readouterr().err


def test_entropy_method_all_as_profile_takes_it(tmp_path, capsys):
    path = tmp_path / "h.pt"
    torch.save(torch.randn(64, 8), path)
    assert main(["entropy", str(path), "--method", "all", "--json", "--backend", "torch"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in out["results"]] == [
        "bucket",
        "gaussian_diag",
        "gaussian_full",
        "knn",
        "renyi",
    ]
