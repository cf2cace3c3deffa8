"""What the test files share: tensors, tiny models, tokenizers, corpora, settings.

Test files import shared helpers from here and only from here: never from ``conftest`` (it
holds fixtures, hooks and environment setup) nor from another test file
(tests/test_layout.py checks it). ``from helpers import ...`` works because pytest puts
tests/ on ``sys.path`` (tests/ has no ``__init__.py``: pytest's default "prepend" import mode
inserts the folder of conftest.py and of each test file), also when the package itself is
installed in site-packages; a child process started by a test inserts it by hand.
"""

from __future__ import annotations

import torch

from entrodrop_fast.models.adapters import get_adapter, supported_model_types
from entrodrop_fast.profile.inmemory import ProfileSettings

# ------------------------------------------------------------------ tensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def llm_like(*shape, seed=0, dtype=torch.float32, outliers=True):
    """Random hidden states with a few channels ~1e4x larger, as in real LLMs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if outliers and shape[-1] >= 4:
        x[..., 1] = x[..., 1] * 50 + 3000.0
        x[..., shape[-1] // 2] *= 400.0
    return x.to(dtype)


def assert_close(ref, tri, rtol, atol=0.0, name=""):
    """Compare a fast result (tri) with the reference (ref), reporting the worst error."""
    ref = torch.as_tensor(ref, dtype=torch.float64).cpu()
    tri = torch.as_tensor(tri, dtype=torch.float64).cpu()
    assert ref.shape == tri.shape, f"{name}: shape {tuple(tri.shape)} != reference {tuple(ref.shape)}"
    err = (ref - tri).abs()
    tol = atol + rtol * ref.abs()
    worst = (err - tol).argmax() if err.numel() else None
    ok = bool((err <= tol).all()) and bool(torch.isfinite(tri).all() == torch.isfinite(ref).all())
    assert ok, f"{name}: max abs err {err.max():.3e}, at {worst}: ref {ref.flatten()[worst]:.8g} vs {tri.flatten()[worst]:.8g} (rtol {rtol}, atol {atol})"


def assert_identical(a, b, path="result", skip=("seconds", "tokens_per_s")):
    """``b`` equals ``a`` exactly (timings aside): same keys, same numbers bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            if k not in skip:
                assert_identical(a[k], b[k], f"{path}.{k}", skip)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}[{i}]", skip)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{path}: {m}")
    elif isinstance(a, float):
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# ------------------------------------------------------------------ tiny models

# what every tiny model has, whatever its architecture and variant
TINY_COMMON = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=97, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
# each architecture comes in two variants:
#   "base":  3 layers, 64 positions, every layer alike (taps, profiling, streaming, loading)
#   "mixed": 4 layers, 128 positions, with the per-layer variety the architecture allows
#            (sliding-window and full-attention layers, dense MLPs among sparse ones), for
#            surgery, ranking and export
VARIANTS = {
    "base": dict(num_hidden_layers=3, max_position_embeddings=64),
    "mixed": dict(num_hidden_layers=4, max_position_embeddings=128),
}
# name -> variant -> config of that architecture on top of TINY_COMMON and VARIANTS;
# "gpt_neox_seq" is GPT-NeoX without parallel residual (model_type gpt_neox)
TINY = {
    "llama": {"base": {}, "mixed": {}},
    "mistral": {"base": dict(sliding_window=8), "mixed": dict(sliding_window=4)},
    "qwen2": {"base": {}, "mixed": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)},
    "qwen3": {"base": dict(head_dim=8), "mixed": {}},
    "phi3": {"base": {}, "mixed": {}},
    "gemma2": {"base": dict(head_dim=8, sliding_window=8), "mixed": dict(head_dim=8, sliding_window=4)},
    "gemma3_text": {
        "base": dict(head_dim=8, sliding_window=8),
        "mixed": dict(head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2),
    },
    "mixtral": {
        "base": dict(num_local_experts=4, num_experts_per_tok=2),
        "mixed": dict(num_local_experts=4, num_experts_per_tok=2),
    },
    "qwen2_moe": {
        "base": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32),
        "mixed": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, decoder_sparse_step=2, mlp_only_layers=[0]),
    },
    "qwen3_moe": {
        "base": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
        "mixed": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1]),
    },
    "olmo2": {"base": {}, "mixed": {}},
    "gpt_neox": {"base": dict(use_parallel_residual=True, rotary_pct=0.5), "mixed": dict(rotary_pct=0.5)},
    "gpt_neox_seq": {"base": dict(use_parallel_residual=False, rotary_pct=0.5), "mixed": dict(use_parallel_residual=False, rotary_pct=0.5)},
    "phi": {"base": dict(partial_rotary_factor=0.5), "mixed": {}},
}
TYPES = supported_model_types()  # the model types (TINY's names but gpt_neox_seq)


def tiny_config(name: str, variant: str = "base", layers: int | None = None, **overrides):
    """The config of TINY[name][variant]; ``layers`` and ``overrides`` replace its fields."""
    from transformers import AutoConfig

    model_type = "gpt_neox" if name == "gpt_neox_seq" else name
    fields = {**TINY_COMMON, **VARIANTS[variant], **TINY[name][variant]}
    if layers is not None:
        fields["num_hidden_layers"] = layers
    return AutoConfig.for_model(model_type, **{**fields, **overrides})


def tiny_model(name: str, variant: str = "base", *, seed: int = 0, layers: int | None = None, perturb_norms: bool = True, **overrides):
    """A tiny random causal LM (see TINY), fp32, eval mode, built after ``torch.manual_seed(seed)``.

    Norms start at identity: unless ``perturb_norms`` is False they are perturbed so that a
    missed or misplaced norm shows."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(name, variant, layers, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if perturb_norms:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(0.3 * torch.randn_like(p))
    return model


def char_llama(layers: int):
    """The evaluation tests' Llama: a vocabulary of 300 for CharTokenizer's byte ids, 512
    positions, no padding id, norms left at identity."""
    return tiny_model("llama", layers=layers, vocab_size=300, max_position_embeddings=512, pad_token_id=None, perturb_norms=False)


def manual_reference_logits(model, plan: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the *unpruned* model with the dropped blocks' contributions removed by hand:
    hooks zero the term each dropped sub-block adds to the residual stream and make each
    dropped layer return its input."""
    ad = get_adapter(model)
    handles = []

    def zero(module, args, out):
        if isinstance(out, tuple):
            return (torch.zeros_like(out[0]), *out[1:])
        return torch.zeros_like(out)

    def identity(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *out[1:]) if isinstance(out, tuple) else x

    layers = ad.layers(model)
    for i in plan.get("attn", []):
        handles.append(ad.attn_out(layers[i]).register_forward_hook(zero))
    for i in plan.get("mlp", []):
        handles.append(ad.mlp_out(layers[i]).register_forward_hook(zero))
    for i in plan.get("layer", []):
        handles.append(layers[i].register_forward_hook(identity, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------ tokenizers and corpora


class CharTokenizer:
    """Bytes as tokens: enough for the evaluation code, no download."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        if isinstance(texts, str):
            return {"input_ids": [min(b, 255) + 1 for b in texts.encode()]}
        return {"input_ids": [[min(b, 255) + 1 for b in t.encode()] for t in texts]}


WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()
DOCS = [f"Document {i}: " + " ".join(WORDS[(j * 7 + i) % len(WORDS)] for j in range(150)) for i in range(10)]


def char_tokenizer():
    """A saveable tokenizer with one token per printable ASCII character, ids 0-96 (the tiny
    models' vocabulary of 97); unknown characters become ``~``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={chr(i): i - 30 for i in range(30, 127)}, unk_token="~"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="~")


def word_tokenizer(n_words: int = 97, **special_tokens):
    """A saveable whitespace tokenizer of the words w0 .. w{n_words-1} (unknown: w0);
    ``special_tokens`` e.g. ``eos_token="w2"``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n_words)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", **special_tokens)


def tiny_dir_and_corpus(root):
    """A tiny Llama directory (seed 6, word tokenizer) under ``root``/tiny and a corpus of its
    words in ``root``/corpus.txt: what the CLI needs to profile, prune and evaluate."""
    d = root / "tiny"
    tiny_model("llama", seed=6).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(f"w{int(i)}" for i in torch.randint(1, 97, (600,), generator=g)))
    return d, corpus


# ------------------------------------------------------------------ profiling settings and windows


def stream_windows(vocab=97, n=7, t=20):
    """Seeded calibration windows of token ids in [3, vocab)."""
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(0))


# the streaming tests (tests/test_streaming*.py)
STREAM_SETTINGS = ProfileSettings(methods=("bucket", "gaussian_diag", "cosine", "angular"), batch_size=3, spans=(1, 2))
# the resume tests (tests/test_resume_faults.py, and its SIGKILLed child processes)
RESUME_SETTINGS = ProfileSettings(methods=("bucket", "knn", "gaussian_diag", "cosine", "angular"), batch_size=3, k=5, spans=(1, 2))
RESUME_W = stream_windows()
