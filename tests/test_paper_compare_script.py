"""benches/paper_compare.py --overwrite removes only the files a study writes."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benches" / "paper_compare.py"


def _module():
    spec = importlib.util.spec_from_file_location("paper_compare", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_overwrite_leaves_the_users_files(tmp_path):
    out = tmp_path / "study"
    (out / "smollm2").mkdir(parents=True)
    ours = [out / "study.json", out / "study.md", out / "smollm2" / "massive.png", out / "smollm2" / "comparison_shared.json"]
    theirs = [out / "notes.txt", out / "smollm2" / "my_analysis.ipynb", out / "gemma3-270m" / "data.bin"]
    for p in ours + theirs:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    _module().remove_earlier_study(out, ["smollm2", "gemma3-270m"])
    assert not any(p.exists() for p in ours)
    assert all(p.read_text() == "x" for p in theirs)
