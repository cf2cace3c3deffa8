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
