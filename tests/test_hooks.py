"""Taps see exactly X and X + F(norm(X)) of every block, checked by running the layers by hand."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, tiny_model

from entrodrop_fast.models import get_adapter
from entrodrop_fast.profile.taps import BlockStatistics, ResidualTaps, TapSettings


class Recorder:
    """A sink that keeps copies of everything it is given (tests only)."""

    def __init__(self):
        self.inputs, self.attn, self.mid, self.mlp, self.out = {}, {}, {}, {}, {}

    def on_input(self, li, r):
        self.inputs[li] = r.clone()

    def on_attn(self, li, x, f):
        self.attn[li] = (x.clone(), f.clone())

    def on_mid(self, li, x, m):
        self.mid[li] = (x.clone(), m.clone())

    def on_mlp(self, li, x, f):
        self.mlp[li] = (x.clone(), f.clone())

    def on_output(self, li, x, y):
        self.out[li] = (x.clone(), y.clone())


def _capture_layer_calls(model, ad):
    """Independent of the taps: the args/kwargs every decoder layer was called with."""
    calls, handles = {}, []
    for li, layer in enumerate(ad.layers(model)):

        def hook(mod, args, kwargs, li=li):
            calls[li] = (args, dict(kwargs))

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles


def _attn(mod, h, kw):
    keep = {k: kw[k] for k in ("attention_mask", "position_ids", "position_embeddings") if k in kw}
    out = mod(hidden_states=h, **keep)
    return out[0] if isinstance(out, tuple) else out


def _by_hand(name, layer, r, kw):
    """(F_attn, X_mlp, F_mlp, Y_layer) of one layer from its input r, per residual structure."""
    if name in ("gemma2", "gemma3_text"):  # sandwich
        a = layer.post_attention_layernorm(_attn(layer.self_attn, layer.input_layernorm(r), kw))
        m = r + a
        f = layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(m)))
        return a, m, f, m + f
    if name == "olmo2":  # post-norm
        a = layer.post_attention_layernorm(_attn(layer.self_attn, r, kw))
        m = r + a
        f = layer.post_feedforward_layernorm(layer.mlp(m))
        return a, m, f, m + f
    if name == "gpt_neox":  # parallel: both branches read r
        a = _attn(layer.attention, layer.input_layernorm(r), kw)
        f = layer.mlp(layer.post_attention_layernorm(r))
        return a, r, f, f + a + r
    if name == "gpt_neox_seq":
        a = _attn(layer.attention, layer.input_layernorm(r), kw)
        m = a + r
        f = layer.mlp(layer.post_attention_layernorm(m))
        return a, m, f, f + m
    if name == "phi":  # parallel, one shared norm
        h = layer.input_layernorm(r)
        a = _attn(layer.self_attn, h, kw)
        f = layer.mlp(h)
        return a, r, f, a + f + r
    # pre-norm (llama, mistral, qwen*, phi3, MoE: the whole sparse block is the mlp)
    a = _attn(layer.self_attn, layer.input_layernorm(r), kw)
    m = r + a
    f = layer.mlp(layer.post_attention_layernorm(m))
    f = f[0] if isinstance(f, tuple) else f
    return a, m, f, m + f


@pytest.mark.parametrize("name", sorted(TINY))
def test_taps_see_x_and_f(name):
    model = tiny_model(name, seed=1)
    ad = get_adapter(model)
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    rec = Recorder()
    calls, handles = _capture_layer_calls(model, ad)
    try:
        with torch.no_grad(), ResidualTaps(model, rec):
            out = model(ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    L = ad.num_layers(model)
    assert sorted(rec.out) == list(range(L))
    assert sorted(rec.mid) == (list(range(L)) if ad.sequential else [])
    hs = out.hidden_states
    with torch.no_grad():
        for li, layer in enumerate(ad.layers(model)):
            args, kw = calls[li]
            r = args[0] if args else kw["hidden_states"]
            torch.testing.assert_close(rec.inputs[li], r, rtol=0, atol=0)
            if li > 0:  # the stream entering layer l is what layer l-1 put out
                torch.testing.assert_close(rec.inputs[li], rec.out[li - 1][1], rtol=0, atol=0)
            torch.testing.assert_close(r, hs[li], rtol=0, atol=0)
            a, xm, f, y = _by_hand(name, layer, r, kw)
            xa, fa = rec.attn[li]
            torch.testing.assert_close(xa, r, rtol=0, atol=0)
            torch.testing.assert_close(fa, a, rtol=1e-6, atol=1e-6)
            xmt, fmt = rec.mlp[li]
            torch.testing.assert_close(xmt, xm, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(fmt, f, rtol=1e-6, atol=1e-6)
            xo, yo = rec.out[li]
            torch.testing.assert_close(xo, r, rtol=0, atol=0)
            torch.testing.assert_close(yo, y, rtol=1e-6, atol=1e-6)
            if ad.sequential:  # Y of attn (X + F) is X of mlp; Y of mlp is the layer output
                torch.testing.assert_close(rec.mid[li][0], r, rtol=0, atol=0)
                torch.testing.assert_close(rec.mid[li][1], xm, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(xa + fa, xmt, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(xmt + fmt, yo, rtol=1e-6, atol=1e-6)
    # the final residual r_L is the last layer's output, not output_hidden_states[-1] (normed)
    torch.testing.assert_close(
        model.get_submodule(ad.arch.final_norm)(rec.out[L - 1][1]), hs[-1], rtol=1e-6, atol=1e-6
    )


def test_hooks_always_removed():
    model = tiny_model("llama")
    ad = get_adapter(model)

    def count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = count()

    class Boom(Recorder):
        def on_mlp(self, li, x, f):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), ResidualTaps(model, Boom(), ad):
            assert count() > before
            model(torch.ones(1, 4, dtype=torch.long))
    assert count() == before


def test_statistics_match_direct_estimators():
    """BlockStatistics' ΔH equals the estimators applied to the recorded X and Y."""
    import entrodrop_fast as ef

    model = tiny_model("llama", seed=2)
    ad = get_adapter(model)
    ids = torch.randint(3, 97, (3, 17), generator=torch.Generator().manual_seed(1))
    rec = Recorder()
    st = BlockStatistics(
        ad,
        3,
        TapSettings(
            ("bucket", "gaussian_diag"),
            cosine=True,
            spans=(1, 2),
            backend="torch",
            entropy_opts={"bucket": {"bins": 7}},
        ),
    )

    class Both:
        def __getattr__(self, name):
            def call(*a):
                getattr(rec, name)(*a)
                getattr(st, name)(*a)

            return call

    with torch.no_grad(), ResidualTaps(model, Both(), ad):
        model.model(ids, use_cache=False)
    st.end_batch()
    res = st.result()
    for li in range(3):
        x, f = rec.attn[li]
        want = ef.bucket_entropy(x + f, bins=7, backend="torch") - ef.bucket_entropy(
            x, bins=7, backend="torch"
        )
        assert res["delta"]["bucket"]["attn"]["mean"][li] == pytest.approx(
            float(want.mean()), rel=1e-9, abs=1e-9
        )
        xm, fm = rec.mlp[li]
        _, y = rec.out[li]
        want = ef.gaussian_diag_entropy(y, backend="torch") - ef.gaussian_diag_entropy(
            xm, backend="torch"
        )
        assert res["delta"]["gaussian_diag"]["mlp"]["mean"][li] == pytest.approx(
            float(want.mean()), rel=1e-9, abs=1e-12
        )
        want = ef.cosine_importance(x, y=y, backend="torch")
        assert res["cosine"]["layer"]["mean"][li] == pytest.approx(float(want.mean()), rel=1e-9)
    last = [rec.inputs[0]] + [rec.out[li][1] for li in range(3)]
    want = ef.angular_distance(last[0], last[2])
    assert res["angular"]["2"]["mean"][0] == pytest.approx(float(want.mean()), rel=1e-9)
    assert res["samples"] == 3
