"""benches/gpu_hotpaths.sh --dry-run: the GPU script's plumbing on the CPU (tiny shapes, no
build, no GPU tests), so that CI runs every step the GPU run takes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_writes_the_report(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "benches" / "gpu_hotpaths.sh"), "--dry-run"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "failed steps: none" in (tmp_path / "summary.txt").read_text()
    rep = json.loads((tmp_path / "hotpaths.json").read_text())
    assert rep["dry_run"] is True and rep["device"] == "cpu"
    calls = {(r["estimator"], tuple(r["shape"])) for r in rep["calls"]}
    assert calls == {
        (c, s) for c in ("bucket", "gaussian_diag", "delta_bucket") for s in ((2, 32, 64), (96, 40))
    }
    assert all(r["default_s"] > 0 and r["default_GBps"] > 0 for r in rep["calls"])
    assert rep["copy"]["copy_GBps"] > 0
    assert [(r["dtype"], r["shape"]) for r in rep["knn"]] == [
        ("fp32", [120, 16]),
        ("bf16", [120, 16]),
    ]
    assert all(r["tiled_max_rel_err"] < 1e-9 for r in rep["knn"])
    if not rep["profiles"]:  # the tap-overhead part says why it did not run
        assert any("tap overhead" in s for s in rep["skipped"])
    else:
        assert set(rep["profiles"]) == {"bucket", "all"}
    md = (tmp_path / "hotpaths.md").read_text()
    assert "| call | shape |" in md and "| knn radii (k = 25) |" in md


def test_unknown_argument_is_refused(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "benches" / "gpu_hotpaths.sh"), "--fast"],
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "unknown argument --fast" in proc.stdout
