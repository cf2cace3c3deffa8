"""compare's evaluation text from several corpora: their held-out parts only, joined in order."""

from entrodrop_fast.data import Corpus, split_documents
from entrodrop_fast.evaluate.compare import heldout_text


def test_heldout_text_joins_the_heldout_parts_and_never_the_calibration_parts():
    a = Corpus("a", [f"alpha document {i} " * 20 for i in range(10)])
    b = Corpus("b", [f"bravo document {i} " * 20 for i in range(7)])
    held = heldout_text([a, b])
    calib_a, held_a = split_documents(a.documents)
    calib_b, held_b = split_documents(b.documents)
    assert held == held_a + held_b and len(held) == 2 + 1
    assert not set(held) & set(calib_a + calib_b)


def test_builtin_and_stdlib_docs_give_the_studys_evaluation_text():
    # the study (benches/paper_compare.py) evaluates on both corpora's held-out fifths
    held = heldout_text(["builtin", "stdlib-docs"])
    assert held[: len(heldout_text(["builtin"]))] == heldout_text(["builtin"])
    assert sum(len(d) for d in held) > 3 * sum(
        len(d) for d in heldout_text(["builtin"])
    )  # 120k vs 31k characters
