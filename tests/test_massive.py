"""Massive-activation diagnosis (massive.py) on constructed tensors with known outliers."""

import pytest
import torch
from helpers import small_llama

from entrodrop_fast.profile import massive as M


def test_range_share_closed_form():
    # one channel 0..9 and a massive token of 100: top-1 removes it, the range falls 100 -> 9
    x = torch.tensor([float(v) for v in range(10)] + [100.0]).view(11, 1)
    s = M.range_share(x, top=1, bins=20)
    assert float(s["share"][0]) == pytest.approx(1 - 9 / 100)
    assert int(s["extreme"][0, 0]) == 10
    # 20 bins of width 5 over [0, 100]: 0-4 and 5-9 hold five tokens each, 100 the last bin
    assert float(s["crowd"][0]) == pytest.approx(5 / 11)


def test_range_share_finds_the_massive_first_token():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 16, generator=g)
    x[0, :] = 500.0  # the sink token, massive in every channel
    x[7, 3] = -800.0  # and one more in one channel
    s = M.range_share(x, top=3)
    want = torch.zeros(16, dtype=torch.int64)
    want[3] = 7  # |-800| beats 500 in channel 3
    assert torch.equal(s["extreme"][0], want)
    assert int(s["extreme"][1, 3]) == 0
    assert float(s["share"].min()) > 0.95  # they set nearly the whole range
    assert float(s["crowd"].min()) > 0.9  # and everything else shares one bin
    clean = M.range_share(torch.randn(128, 16, generator=g), top=3)
    assert float(clean["share"].mean()) < 0.5
    assert float(clean["crowd"].mean()) < 0.35


def test_constant_channel_and_bad_input():
    x = torch.zeros(10, 2)
    x[:, 1] = torch.arange(10.0)
    s = M.range_share(x, top=2)
    assert float(s["share"][0]) == 0.0 and float(s["crowd"][0]) == 1.0
    with pytest.raises(ValueError, match="T, D"):
        M.range_share(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="top"):
        M.range_share(torch.zeros(4, 2), top=3)


def test_token_class():
    assert M.token_class("The", 0) == "first"
    assert M.token_class(",", 5) == "punct/space"
    assert M.token_class(" \n", 5) == "punct/space"
    assert M.token_class(" cat", 5) == "word"


class _Tok:
    def decode(self, ids):
        return "".join("." if i % 5 == 0 else chr(97 + i % 26) for i in ids)


def test_diagnose_on_a_tiny_model_with_a_planted_massive_embedding():
    model = small_llama()
    with torch.no_grad():
        model.get_input_embeddings().weight[7] *= 1000.0  # token 7: a massive embedding
    windows = torch.randint(8, 64, (4, 20), generator=torch.Generator().manual_seed(1))
    windows[:, 0] = 7  # at the first position of every window
    d = M.diagnose(model, _Tok(), windows, top=2, bins=10, batch_size=3)
    assert [p["point"] for p in d["points"]] == ["r0", "r1", "r2", "r3"]
    r0 = d["points"][0]
    assert r0["where"]["first"] > 0.45  # one of the two extreme slots of every channel
    assert r0["tokens"][0]["id"] == 7 and r0["tokens"][0]["mean_position"] == 0
    assert r0["share_mean"] > 0.9 and r0["norm_ratio"] > 100
    for p in d["points"]:
        assert sum(p["where"].values()) == pytest.approx(1.0)
    emb = model.get_input_embeddings()(windows).detach()
    want = torch.stack([M.range_share(emb[b], 2, 10)["share"] for b in range(4)]).mean()
    assert r0["share_mean"] == pytest.approx(float(want))
    assert "| r0 |" in M.markdown(d)


def test_plot_writes_a_png(tmp_path):
    d = {
        "top": 3,
        "bins": 20,
        "samples": 1,
        "seq_len": 8,
        "points": [
            {
                "point": f"r{i}",
                "share_mean": 0.1 * i,
                "share_half": 0.05 * i,
                "crowd_mean": 0.2,
                "norm_ratio": 3.0,
                "where": {"first": 0.5, "punct/space": 0.2, "word": 0.3},
                "tokens": [],
            }
            for i in range(3)
        ],
    }
    M.plot(d, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 1000
