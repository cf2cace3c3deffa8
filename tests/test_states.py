"""Streaming states: merge(update(a), update(b)) == update(a ++ b); serialisable."""

import torch
from helpers import assert_close, llm_like

import entrodrop_fast as ef


def test_sample_stats_merge_and_result():
    v = torch.randn(20, 3, dtype=torch.float64)
    a, b, whole = ef.SampleStats((3,)), ef.SampleStats((3,)), ef.SampleStats((3,))
    a.update(v[:7])
    b.update(v[7:12]).update(v[12:])
    whole.update(v)
    a.merge(b)
    ra, rw = a.result(), whole.result()
    assert ra["n"] == rw["n"] == 20
    assert_close(v.mean(0), ra["mean"], 1e-12)
    assert_close(v.std(0) / 20**0.5, ra["stderr"], 1e-12)
    assert_close(rw["stderr"], ra["stderr"], 1e-12)
    c = ef.SampleStats.from_state_dict(a.state_dict())
    assert_close(ra["mean"], c.result()["mean"], 0)


def test_moment_state_merge_equals_whole():
    x = llm_like(6, 50, 9, seed=3)
    a, b, whole = ef.MomentState(9), ef.MomentState(9), ef.MomentState(9)
    a.update(x[:2], backend="torch")
    b.update(x[2:], backend="torch")
    whole.update(x.reshape(1, 300, 9), backend="torch")
    a.merge(b)
    ra, rw = a.result(), whole.result()
    flat = x.reshape(300, 9).double()
    assert ra["count"] == 300
    assert_close(flat.mean(0), ra["mean"], 1e-12)
    assert_close(flat.var(0, unbiased=False), ra["var"], 1e-10)
    assert_close(rw["var"], ra["var"], 1e-10)
    assert torch.equal(ra["max"], x.reshape(300, 9).amax(0))
    restored = ef.MomentState.from_state_dict(a.state_dict())
    assert_close(ra["gaussian_diag_entropy"], restored.result()["gaussian_diag_entropy"], 0)


def test_cov_state_merge_equals_whole():
    x = llm_like(4, 60, 5, seed=4)
    a, b = ef.CovState(5), ef.CovState(5)
    a.update(x[:1])
    b.update(x[1:])
    a.merge(b)
    flat = x.reshape(240, 5).double()
    assert_close(flat.T.cov(correction=0), a.result()["cov"], 1e-9, atol=1e-9)
    assert_close(
        ef.CovState.from_state_dict(a.state_dict()).result()["gaussian_full_entropy"],
        a.result()["gaussian_full_entropy"],
        0,
    )


def test_entropy_meter():
    x = torch.randn(5, 30, 4)
    m1, m2 = ef.EntropyMeter("gaussian_diag"), ef.EntropyMeter("gaussian_diag")
    h = m1.update(x[:2])
    m2.update(x[2:])
    m1.merge(m2)
    whole = ef.gaussian_diag_entropy(x)
    assert_close(whole[:2], h, 0)
    assert_close(whole.mean(), m1.result()["mean"], 1e-12)
    assert m1.result()["n"] == 5
    m3 = ef.EntropyMeter.from_state_dict(m1.state_dict())
    assert_close(m1.result()["stderr"], m3.result()["stderr"], 0)
