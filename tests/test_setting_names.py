"""Library messages name a setting by its Python spelling, inside a command by its flag."""

from entrodrop_fast._names import setting, spelled
from entrodrop_fast.cli import build_parser, flag_spellings


def test_python_spelling_by_default():
    assert setting("drop") == "drop"
    assert setting("overwrite", python="overwrite=True") == "overwrite=True"


def test_spelled_block_names_flags_and_restores():
    with spelled({"drop": "--drop"}):
        assert setting("drop") == "--drop"
        assert setting("overwrite", python="overwrite=True") == "overwrite=True"
        with spelled({"overwrite": "--overwrite"}):
            assert setting("overwrite", python="overwrite=True") == "--overwrite"
            assert setting("drop") == "--drop"
        assert setting("overwrite", python="overwrite=True") == "overwrite=True"
    assert setting("drop") == "drop"


def test_commands_spell_their_own_options():
    parser = build_parser()
    rank = flag_spellings(parser, "rank")
    assert rank["drop"] == "--drop" and rank["protect"] == "--protect"
    assert flag_spellings(parser, "profile")["resume_dir"] == "--resume-dir"
    assert "help" not in rank


def test_advice_names_a_command_only_inside_one():
    from entrodrop_fast._names import how

    assert how("entrodrop rank --drop N", "make_plan(report, kind, drop)") == (
        "make_plan(report, kind, drop)"
    )
    with spelled({"drop": "--drop"}):
        assert how("entrodrop rank --drop N", "make_plan(report, kind, drop)") == (
            "entrodrop rank --drop N"
        )


def test_an_empty_plan_from_python_names_the_library_call():
    import pytest

    from entrodrop_fast.prune.surgery import normalize_drops

    with pytest.raises(ValueError, match=r"make_plan\(report, kind, drop\)"):
        normalize_drops({"attn": []}, 4)
