"""--preset paper on the command line: profile (knn, batch 1) and rank (layers 0, 1, last)."""

import json

import pytest
from helpers import char_llama_dir

from entrodrop_fast.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with a character tokenizer saved beside it (no download)."""
    return char_llama_dir(tmp_path_factory.mktemp("tiny_llama_preset"), layers=6)


def test_profile_and_rank_with_the_paper_preset(tiny_dir, tmp_path, capsys):
    rep = tmp_path / "rep"
    assert (
        main(
            [
                "profile",
                str(tiny_dir),
                "--preset",
                "paper",
                "--samples",
                "3",
                "--seq-len",
                "40",
                "--out",
                str(rep),
                "--no-plot",
                "-q",
                "--method",
                "cosine",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "--preset paper: llama: the paper's Llama code (knn, k = 25, paper form)" in err
    report = json.loads((rep / "report.json").read_text())
    assert report["settings"]["preset"] == "paper"
    assert report["settings"]["batch_size"] == 1 and report["settings"]["k"] == 25
    assert (
        list(report["entropy"]) == ["knn"] and report["blocks"][0]["cosine"]
    )  # --method adds to the preset's
    assert (
        main(
            [
                "rank",
                str(rep),
                "--kind",
                "attn",
                "--drop",
                "2",
                "--out",
                str(tmp_path / "plan.json"),
            ]
        )
        == 0
    )
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["method"] == "knn" and plan["protected"] == [0, 1, 5]  # from the report's preset
    assert plan["protected_reason"]["preset"] == "paper"
    assert not set(plan["drop"]["attn"]) & {0, 1, 5}
    # cosine ranks under the same fixed protection
    assert (
        main(
            [
                "rank",
                str(rep),
                "--kind",
                "attn",
                "--drop",
                "2",
                "--method",
                "cosine",
                "--out",
                str(tmp_path / "p2.json"),
                "--overwrite",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "p2.json").read_text())["protected"] == [0, 1, 5]


def test_preset_errors_are_one_line(tmp_path, capsys):
    assert (
        main(
            [
                "profile",
                str(tmp_path / "missing.gguf"),
                "--preset",
                "paper",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert (
        "entrodrop profile: error: --preset paper reads the architecture" in err
        and "Traceback" not in err
    )
    with pytest.raises(SystemExit):
        main(["profile", "--preset", "fast"])


def test_prune_with_the_paper_preset(tiny_dir, tmp_path, capsys):
    # prune profiles with the preset itself (knn, k = 25, batch 1) and protects layers 0, 1 and
    # the last
    out = tmp_path / "pruned"
    assert (
        main(
            [
                "prune",
                str(tiny_dir),
                "--preset",
                "paper",
                "--kind",
                "layer",
                "--drop",
                "2",
                "--samples",
                "3",
                "--seq-len",
                "40",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "--preset paper: llama" in captured.err and "Traceback" not in captured.err
    plan = json.loads((out / "entrodrop_plan.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4
    from entrodrop_fast import load_pruned

    model = load_pruned(out)
    assert len(model.model.layers) == 4
    assert plan["method"] == "knn" and plan["protected"] == [0, 1, 5]
    assert not set(plan["drop"]["layer"]) & {0, 1, 5}


def test_preset_for_model_from_a_config_or_a_source(tiny_dir):
    # one resolution of the paper preset for profile, prune and compare
    from transformers import AutoConfig

    from entrodrop_fast.profile.presets import preset_for_model

    as_dict = preset_for_model({"model_type": "mistral", "num_hidden_layers": 4})
    assert (
        as_dict["method"] == "bucket" and as_dict["bins"] == 80 and as_dict["protect"] == [0, 1, 3]
    )
    from_dir = preset_for_model(str(tiny_dir))
    from_config = preset_for_model(AutoConfig.from_pretrained(tiny_dir))
    assert from_dir == from_config
    assert from_dir["method"] == "knn" and from_dir["protect"] == [0, 1, 5]
    with pytest.raises(ValueError, match="preset paper reads the architecture"):
        preset_for_model("some-org/not-local")


def test_prune_iterative_on_the_command_line(tiny_dir, tmp_path, capsys):
    # `prune --iterative` calls the library's iterative_plan_for on the very files it prunes
    out = tmp_path / "pruned_iter"
    argv = ["prune", str(tiny_dir), "--iterative", "--kind", "attn", "--drop", "2"]
    argv += ["--protect", "0,5", "--samples", "2", "--seq-len", "24", "--out", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "profiling" in err
    plan = json.loads((out / "entrodrop_plan.json").read_text())
    assert plan["iterative"] is True and plan["protected"] == [0, 5]
    dropped = plan["drop"]["attn"]
    assert len(dropped) == 2 and not {0, 5} & set(dropped)
    assert sorted(s["layer"] for s in plan["steps"]) == dropped  # one block a step
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
