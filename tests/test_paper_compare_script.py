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
    ours = [
        out / _module().MARKER,
        out / "study.json",
        out / "study.md",
        out / "smollm2" / "massive.png",
        out / "smollm2" / "comparison_shared.json",
    ]
    theirs = [
        out / "notes.txt",
        out / "smollm2" / "my_analysis.ipynb",
        out / "gemma3-270m" / "data.bin",
    ]
    for p in ours + theirs:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    log = out / "smollm2" / "evaluations.jsonl"  # the first file a study writes for a model
    log.write_text('{"settings": {"model": "smollm2"}}\n')
    ours.append(log)
    # a link of a study's name to a file of the user's elsewhere: neither is touched
    elsewhere = tmp_path / "elsewhere.md"
    elsewhere.write_text("x")
    (out / "smollm2" / "massive.md").symlink_to(elsewhere)
    theirs.append(elsewhere)
    _module().remove_earlier_study(out, ["smollm2", "gemma3-270m"])
    assert not any(p.exists() for p in ours)
    assert all(p.read_text() == "x" for p in theirs)
    assert (out / "smollm2" / "massive.md").is_symlink()


def test_overwrite_removes_nothing_of_a_model_directory_no_study_wrote(tmp_path):
    # the study's marker at the top does not make every model directory under it a study's:
    # gemma3-270m/result.json here is the user's (no evaluation log beside it)
    mod = _module()
    out = tmp_path / "study"
    (out / "smollm2").mkdir(parents=True)
    (out / mod.MARKER).write_text("")
    (out / "smollm2" / "evaluations.jsonl").write_text('{"settings": {"model": "smollm2"}}\n')
    (out / "smollm2" / "result.json").write_text("ours")
    theirs = out / "gemma3-270m" / "result.json"
    theirs.parent.mkdir()
    theirs.write_text("mine")
    try:
        mod.remove_earlier_study(out, ["smollm2", "gemma3-270m"])
    except SystemExit as e:
        assert "gemma3-270m/result.json" in str(e)
    else:
        raise AssertionError("a model directory no study wrote lost its result.json")
    assert theirs.read_text() == "mine"
    assert (out / "smollm2" / "result.json").read_text() == "ours"  # refused before removing


def test_evaluation_log_survives_an_interrupted_run(tmp_path):
    mod = _module()
    path = tmp_path / "smollm2" / "evaluations.jsonl"
    settings = {"model": "smollm2", "items": 200}
    log = mod.EvaluationLog(path, settings)
    assert len(log) == 0 and path.is_file()
    log["attn:1,2"] = {
        "perplexity": {"perplexity": float("inf")},
        "correct": {"last_word": [1, 0]},
        "params": 7,
    }
    log["-"] = {"perplexity": {"perplexity": 12.5}, "correct": {"last_word": [1, 1]}, "params": 9}
    # the run stops in the middle of writing a third evaluation
    with path.open("a") as f:
        f.write('{"key": "layer:3", "evaluat')
    again = mod.EvaluationLog(path, settings)
    assert set(again) == {"attn:1,2", "-"}
    assert again["attn:1,2"]["perplexity"]["perplexity"] == float("inf")
    assert again["-"]["params"] == 9


def test_evaluation_log_refuses_other_settings(tmp_path):
    mod = _module()
    path = tmp_path / "evaluations.jsonl"
    mod.EvaluationLog(path, {"items": 200})["-"] = {"params": 1}
    try:
        mod.EvaluationLog(path, {"items": 8})
    except SystemExit as e:
        assert "other evaluation settings" in str(e)
    else:
        raise AssertionError("a log written with other settings was reused")
    assert path.read_text().count("\n") == 2  # nothing of the earlier study was lost


def test_resume_and_overwrite_are_refused_together(tmp_path, capsys):
    mod = _module()
    assert mod.main(["--out", str(tmp_path), "--resume", "--overwrite"]) == 1
    assert "give one" in capsys.readouterr().err
    assert mod.main(["--out", str(tmp_path / "new"), "--resume"]) == 1
    assert "no study of this script to continue" in capsys.readouterr().err


def test_redo_calibration_rewrites_only_a_finished_study(tmp_path, capsys):
    """--redo-calibration replaces MODEL/result.json and the comparison files, so it runs only
    with --resume, on a model whose result.json this study wrote (same grid): a directory of
    someone else's files is left as it was."""
    mod = _module()
    theirs = tmp_path / "smollm2" / "result.json"
    theirs.parent.mkdir()
    theirs.write_text('{"mine": true}')
    assert mod.main(["--out", str(tmp_path), "--redo-calibration"]) == 1
    assert "add --resume" in capsys.readouterr().err
    grid = dict(mod.METHODS)
    assert mod.finished_model(tmp_path / "smollm2", grid, "fp32") is None  # not the study's
    assert theirs.read_text() == '{"mine": true}'


def test_reused_evaluations_need_the_same_settings_and_keep_the_log_whole(tmp_path):
    mod = _module()
    settings = {"model": "smollm2", "items": 200}
    theirs = mod.EvaluationLog(tmp_path / "a" / "smollm2" / "evaluations.jsonl", settings)
    theirs["attn:1,2"] = {"params": 7}
    theirs["-"] = {"params": 9}
    ours = mod.EvaluationLog(tmp_path / "b" / "smollm2" / "evaluations.jsonl", settings)
    ours["-"] = {"params": 9}
    assert ours.adopt(tmp_path / "a" / "smollm2" / "evaluations.jsonl") == 1
    assert ours.adopt(tmp_path / "nothing-here.jsonl") == 0
    again = mod.EvaluationLog(ours.path, settings)  # the adopted one was appended to our log
    assert again == {"-": {"params": 9}, "attn:1,2": {"params": 7}}
    other = mod.EvaluationLog(
        tmp_path / "c" / "evaluations.jsonl", {"model": "smollm2", "items": 8}
    )
    try:
        other.adopt(theirs.path)
    except SystemExit as e:
        assert "not comparable" in str(e)
    else:
        raise AssertionError("evaluations made with other settings were reused")
    assert len(other) == 0


def test_the_methods_grid_covers_every_method_and_setting_at_one_k():
    mod = _module()
    g = mod.METHODS
    assert set(g["methods"]) == set(mod.ENTROPY + mod.SIMILARITY + ["random"])
    assert g["rules"] == ["shared", "paper"] and g["random_seeds"] == 3
    assert g["iterative"] == ["knn", "cosine"] and all(v == [2] for v in g["counts"].values())
    assert {k: g[k] for k in ("items", "eval_windows")} == {"items": 200, "eval_windows": 64}


def test_the_k_sweep_extends_the_cpu2h_rows_along_k_with_the_same_evaluation():
    # K from 1 or 2 to about a third of the layers, for the paper's two estimators and
    # cosine, evaluated as the cpu2h study was (so that --reuse-evaluations takes its cells)
    mod = _module()
    g, c = mod.KSWEEP, mod.CPU2H
    assert g["counts"] == mod.FULL["counts"]
    assert g["counts"]["smollm2"][-1] == 10 and g["counts"]["gemma3-270m"] == [1, 2, 4, 6]
    assert all(set(c["counts"][m]) <= set(g["counts"][m]) for m in g["counts"])
    assert {"bucket", "knn", "cosine"} <= set(g["methods"]) and g["rules"] == ["shared"]
    for m in g["models"]:
        assert mod.eval_settings(m, g, "fp32") == mod.eval_settings(m, c, "fp32")
    assert mod.main(["--out", "unused", "--grid", "ksweep", "--estimate"]) == 0


def test_a_model_finished_by_another_run_of_the_grid_is_kept(tmp_path):
    # one model per run (--models), then the other with --resume: the first is neither
    # recomputed nor left out of study.json, whichever models each run named
    mod = _module()
    grid = dict(mod.METHODS, models=["smollm2"])
    d = tmp_path / "smollm2"
    d.mkdir()
    (d / "result.json").write_text(
        mod.json.dumps({"grid": grid, "dtype": "fp32", "result": {"model": "smollm2"}})
    )
    assert not mod.holds_study(tmp_path)  # a result.json alone may be anyone's
    (tmp_path / mod.MARKER).write_text("")  # what the run that wrote it leaves
    assert mod.holds_study(tmp_path) and not mod.holds_study(tmp_path / "gemma3-270m")
    both = dict(grid, models=["smollm2", "gemma3-270m"])
    assert mod.finished_model(d, both, "fp32") == {"model": "smollm2"}
    assert mod.finished_model(d, both, "bf16") is None  # another dtype
    other = dict(mod.CPU2H, models=["smollm2"])
    assert mod.finished_model(d, other, "fp32") is None  # another grid
    assert mod.finished_model(tmp_path / "gemma3-270m", both, "fp32") is None


def _users_dir(tmp_path):
    # a directory of the user's own files, two of them named as a study's files are
    out = tmp_path / "mine"
    (out / "smollm2").mkdir(parents=True)
    files = {
        out / "smollm2" / "result.json": '{"mine": 1}',
        out / "study.md": "# my study notes",
        out / "notes.txt": "keep",
    }
    for p, text in files.items():
        p.write_text(text)
    return out, files


def test_resume_refuses_a_directory_of_the_users_files(tmp_path, capsys):
    # a fresh user's test: --resume took a result.json of the user's for a study and replaced
    # it and study.md
    mod = _module()
    out, files = _users_dir(tmp_path)
    assert mod.main(["--out", str(out), "--quick", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "holds no study of this script" in err and "choose a new --out" in err
    assert all(p.read_text() == text for p, text in files.items())
    assert not (out / mod.MARKER).exists()
    # a study written before the marker existed is recognised by its evaluation log
    log = mod.EvaluationLog(out / "gemma3-270m" / "evaluations.jsonl", {"model": "gemma3-270m"})
    assert mod.holds_study(out) and len(log) == 0


def test_overwrite_refuses_to_remove_the_users_files_of_a_studys_names(tmp_path, capsys):
    mod = _module()
    out, files = _users_dir(tmp_path)
    try:
        mod.main(["--out", str(out), "--quick", "--overwrite"])
    except SystemExit as e:
        assert "no study of this script wrote there" in str(e) and "study.md" in str(e)
    else:
        raise AssertionError("--overwrite removed files of a directory that holds no study")
    assert all(p.read_text() == text for p, text in files.items())


def test_bad_out_and_reuse_paths_are_one_line_errors(tmp_path, capsys):
    mod = _module()
    afile = tmp_path / "afile.txt"
    afile.write_text("mine")
    assert mod.main(["--out", str(afile), "--quick"]) == 1
    assert "exists and is not a directory" in capsys.readouterr().err
    assert afile.read_text() == "mine"
    for reuse in (tmp_path / "typo", tmp_path):  # missing, or holding no evaluation log
        assert (
            mod.main(["--out", str(tmp_path / "new"), "--quick", "--reuse-evaluations", str(reuse)])
            == 1
        )
        assert "holds no evaluation log of smollm2" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_an_interrupted_study_says_how_to_continue(monkeypatch, capsys):
    mod = _module()

    def interrupted(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "main", interrupted)
    assert mod._main() == 130
    assert "add --resume" in capsys.readouterr().err
