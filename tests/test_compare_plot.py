"""compare's figure: one colour per method across panels; block_influence drawn once when it
equals cosine."""

from entrodrop_fast.evaluate.compare import _same_as_cosine, plot


def _row(kind, method, k, key, ppl=20.0, retained=0.9):
    return {
        "kind": kind,
        "method": method,
        "setting": "one-shot",
        "k": k,
        "eval_key": key,
        "perplexity": ppl,
        "retained": retained,
        "ci95": {"perplexity": [ppl - 1, ppl + 1]},
    }


def test_block_influence_is_merged_only_when_it_picked_cosines_blocks():
    rows = [
        _row("layer", "cosine", 2, "a"),
        _row("layer", "block_influence", 2, "a"),
        _row("layer", "cosine", 4, "b"),
        _row("layer", "block_influence", 4, "b"),
    ]
    assert _same_as_cosine(rows, "layer")
    rows[-1] = _row("layer", "block_influence", 4, "c")
    assert not _same_as_cosine(rows, "layer")
    assert not _same_as_cosine(rows, "attn")  # no block_influence rows there


def test_plot_writes_the_figure(tmp_path):
    rows = [
        _row("attn", "bucket", 2, "x"),
        _row("attn", "cosine", 2, "y"),
        _row("layer", "cosine", 2, "z"),
        _row("layer", "block_influence", 2, "z"),
        _row("layer", "knn", 2, "w"),
    ]
    out = tmp_path / "c.png"
    plot({"rows": rows, "model": {"name": "tiny"}}, out)
    assert out.stat().st_size > 1000
