"""What the test files share: tensors, tiny models, tokenizers, corpora, settings.

Test files import shared helpers from here and only from here: never from ``conftest`` (it
holds fixtures, hooks and environment setup) nor from another test file
(tests/test_layout.py checks it). ``from helpers import ...`` works because pytest puts
tests/ on ``sys.path`` (tests/ has no ``__init__.py``: pytest's default "prepend" import mode
inserts the folder of conftest.py and of each test file), also when the package itself is
installed in site-packages; a child process started by a test inserts it by hand.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from entrodrop_fast.cli import main
from entrodrop_fast.models.adapters import get_adapter, supported_model_types
from entrodrop_fast.ops import backends as B
from entrodrop_fast.ops import reference as ref_ops
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
    assert ref.shape == tri.shape, (
        f"{name}: shape {tuple(tri.shape)} != reference {tuple(ref.shape)}"
    )
    err = (ref - tri).abs()
    tol = atol + rtol * ref.abs()
    worst = (err - tol).argmax() if err.numel() else None
    ok = bool((err <= tol).all()) and bool(torch.isfinite(tri).all() == torch.isfinite(ref).all())
    assert ok, (
        f"{name}: max abs err {err.max():.3e}, at {worst}: ref {ref.flatten()[worst]:.8g} vs "
        f"{tri.flatten()[worst]:.8g} (rtol {rtol}, atol {atol})"
    )


def assert_identical(a, b, path="result", skip=("seconds", "tokens_per_s", "resumed_from_layer")):
    """``b`` equals ``a`` exactly (timings and where a resumed run started aside): same keys,
    same numbers bit for bit."""
    if isinstance(a, dict):
        ka, kb = set(a) - set(skip), set(b) - set(skip)
        assert isinstance(b, dict) and ka == kb, f"{path}: keys {sorted(ka)} != {sorted(kb)}"
        for k in ka:
            if k not in skip:
                assert_identical(a[k], b[k], f"{path}.{k}", skip)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}[{i}]", skip)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(
            b, a, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{path}: {m}"
        )
    elif isinstance(a, float):
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# ------------------------------------------------------------------ tiny models

# what every tiny model has, whatever its architecture and variant
TINY_COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
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
    "qwen2": {
        "base": {},
        "mixed": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
    },
    "qwen3": {"base": dict(head_dim=8), "mixed": {}},
    "phi3": {"base": {}, "mixed": {}},
    "gemma2": {
        "base": dict(head_dim=8, sliding_window=8),
        "mixed": dict(head_dim=8, sliding_window=4),
    },
    "gemma3_text": {
        "base": dict(head_dim=8, sliding_window=8),
        "mixed": dict(
            head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2
        ),
    },
    "mixtral": {
        "base": dict(num_local_experts=4, num_experts_per_tok=2),
        "mixed": dict(num_local_experts=4, num_experts_per_tok=2),
    },
    "qwen2_moe": {
        "base": dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
        ),
        "mixed": dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            decoder_sparse_step=2,
            mlp_only_layers=[0],
        ),
    },
    "qwen3_moe": {
        "base": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
        "mixed": dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        ),
    },
    "olmo2": {"base": {}, "mixed": {}},
    "gpt_neox": {
        "base": dict(use_parallel_residual=True, rotary_pct=0.5),
        "mixed": dict(rotary_pct=0.5),
    },
    "gpt_neox_seq": {
        "base": dict(use_parallel_residual=False, rotary_pct=0.5),
        "mixed": dict(use_parallel_residual=False, rotary_pct=0.5),
    },
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


def tiny_model(
    name: str,
    variant: str = "base",
    *,
    seed: int = 0,
    layers: int | None = None,
    perturb_norms: bool = True,
    **overrides,
):
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
    return tiny_model(
        "llama",
        layers=layers,
        vocab_size=300,
        max_position_embeddings=512,
        pad_token_id=None,
        perturb_norms=False,
    )


def small_llama():
    """A random 3-layer ``LlamaForCausalLM`` (vocabulary 64, hidden 32, MLP 48, 4 heads, 2 KV
    heads), fp32, eval mode, built after ``torch.manual_seed(0)``; norms at identity."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


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
DOCS = [
    f"Document {i}: " + " ".join(WORDS[(j * 7 + i) % len(WORDS)] for j in range(150))
    for i in range(10)
]


def char_tokenizer():
    """A saveable tokenizer with one token per printable ASCII character, ids 0-96 (the tiny
    models' vocabulary of 97); unknown characters become ``~``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={chr(i): i - 30 for i in range(30, 127)}, unk_token="~"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="~")


def char_llama_dir(d, layers: int | None = None, max_shard_size=None, **config):
    """``d`` holding ``tiny_model("llama", layers=layers)`` with :func:`char_tokenizer` beside it
    (no download); ``config`` fields are set on its config after it is built (the weights stay
    those of the tiny model), ``max_shard_size`` (e.g. ``"60KB"``) splits its safetensors."""
    model = tiny_model("llama", layers=layers)
    for name, value in config.items():
        setattr(model.config, name, value)
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(d, **shards)
    char_tokenizer().save_pretrained(d)
    return d


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


# ------------------------------------------------------------------ the command line


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``entrodrop ARGV...`` in this process (each argument as ``str``): (exit code, stdout,
    stderr)."""
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_clean_error(rc: int, err: str, command: str, *needles: str) -> str:
    """Exit 1, one ``entrodrop CMD: error:`` message holding each needle, no traceback; returns
    that message (stderr's last line: progress bars, of model loading, may come before it)."""
    assert rc == 1, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"entrodrop {command}: error: "), err
    for n in needles:
        assert n in last, f"{n!r} not in {last!r}"
    return last


def run_child(code: str, inputs, tmp_path, **env):
    """What ``python -c code IN OUT`` saved to OUT (``torch.save``), run with ``env`` added to the
    environment after ``inputs`` were saved to IN; both files in ``tmp_path``, the child's
    working directory (not the source tree: it imports the installed package)."""
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(inputs, src)
    subprocess.run(
        [sys.executable, "-c", code, str(src), str(out)],
        check=True,
        env=dict(os.environ, **env),
        cwd=tmp_path,
    )
    return torch.load(out)


# ------------------------------------------------------------------ profiling settings and windows


def stream_windows(vocab=97, n=7, t=20):
    """Seeded calibration windows of token ids in [3, vocab)."""
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(0))


# the streaming tests (tests/test_streaming*.py)
STREAM_SETTINGS = ProfileSettings(
    methods=("bucket", "gaussian_diag", "cosine", "angular"), batch_size=3, spans=(1, 2)
)
# the resume tests (tests/test_resume_faults.py, and its SIGKILLed child processes)
RESUME_SETTINGS = ProfileSettings(
    methods=("bucket", "knn", "gaussian_diag", "cosine", "angular"), batch_size=3, k=5, spans=(1, 2)
)
RESUME_W = stream_windows()


# ---------------------------------------------------------------- the backend conformance suite
# Helpers shared by the backend tests (test_backends.py, the conformance suite, and the
# backend-specific test_cpp_backend.py, test_triton_backend.py, test_cuda_backend.py): the
# backends to run, inputs (LLM-like, strided, masked, with NaN/Inf), reference bin counts and
# the comparisons with the torch reference, with each backend's tolerances.

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
NAN, INF = float("nan"), float("inf")

# the estimators' options in the API tests (ef.entropy(x, method, **ESTIMATOR_KW[method]))
ESTIMATOR_KW = {
    "bucket": {"bins": 20},
    "gaussian_diag": {},
    "gaussian_full": {"ridge": 1e-6},
    "knn": {"k": 3},
    "renyi": {},
}


@dataclass(frozen=True)
class Tol:
    """How close a backend's results must be to the reference's (its fp32 arithmetic)."""

    mean_rel: float  # |mean - ref| <= mean_rel |ref| + mean_std * std + 1e-30
    mean_std: float
    m2: tuple[float, float]  # (rtol, atol)
    cosine: tuple[float, float, bool]  # (rtol, atol, atol per valid token)
    knn: tuple[float, float]
    f64_moments: bool  # mean/m2 float64, min/max float32 (GPU backends may return float32)


# cpp: fp32 sums of fp32 values (fp64 merges); triton / cuda: fp32 chunks, fp64 merges; torch:
# the reference itself (bit for bit)
TOLS = {
    "torch": Tol(0.0, 0.0, (0.0, 0.0), (0.0, 0.0, False), (0.0, 0.0), True),
    "cpp": Tol(1e-6, 1e-6, (1e-5, 1e-30), (1e-6, 1e-6, True), (1e-5, 0.0), True),
    "triton": Tol(1e-5, 1e-6, (1e-5, 1e-9), (1e-5, 1e-6, False), (1e-5, 1e-6), False),
    "cuda": Tol(1e-5, 1e-6, (1e-5, 1e-9), (1e-5, 1e-6, False), (1e-5, 1e-6), False),
}


@dataclass(frozen=True)
class Backend:
    """One backend on one device, its ops as ops/backends.py routes them."""

    name: str
    dev: str

    def op(self, op: str):
        return B.kernel(self.name, self.dev, op)

    @property
    def mod(self):
        return B._import(self.name)

    @property
    def tol(self) -> Tol:
        return TOLS[self.name]

    @property
    def interpreted(self) -> bool:  # Triton's interpreter: slow, small cases only
        return self.name == "triton" and self.dev == "cpu"

    def counts(self):
        """The backend's own bin-count function (bucket_counts) or None."""
        if self.name == "cuda":
            return self.mod.bucket_counts
        if self.name == "triton":
            from entrodrop_fast.ops.triton.bucket import bucket_counts

            return bucket_counts
        return None


def backend_params():
    """Every backend and device this suite knows, skipped where unavailable (cpp never skips:
    CI builds the extension, and a missing build must fail)."""
    triton_dev = "cpu" if INTERPRET else "cuda"
    no_triton = not HAS_TRITON or (triton_dev == "cuda" and not HAS_CUDA)
    return [
        pytest.param(Backend("torch", "cpu"), id="torch-cpu"),
        pytest.param(Backend("cpp", "cpu"), id="cpp-cpu"),
        pytest.param(
            Backend("triton", triton_dev),
            id=f"triton-{triton_dev}",
            marks=[
                pytest.mark.triton,
                pytest.mark.skipif(
                    no_triton, reason="triton missing (or TRITON_INTERPRET=0 without a GPU)"
                ),
            ],
        ),
        pytest.param(
            Backend("cuda", "cuda"),
            id="cuda-cuda",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")],
        ),
        pytest.param(
            Backend("torch", "cuda"),
            id="torch-cuda",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")],
        ),
    ]


def require(be: Backend) -> Backend:
    """The backend, available (cpp: asserted; the others: skipped when not)."""
    mod = B._module(be.name)
    if be.name == "cpp":
        assert mod is not None, B._load_errors.get("cpp")
    elif mod is None or be.dev not in mod.devices():
        pytest.skip(
            f"{be.name} backend unavailable on {be.dev}: "
            f"{B._load_errors.get(be.name, 'no such device')}"
        )
    return be


# ------------------------------------------------------------------ inputs


def make(shape, dtype, dev, seed=0, strided=False):
    """LLM-like [B, T, D] on dev; strided: channel stride 2, samples interleaved between tokens
    (strides (2D, 2BD, 2)), built on dev (``.to`` would copy it contiguous)."""
    x = llm_like(*shape, seed=seed, dtype=dtype).to(dev)
    if strided:
        Bn, T, D = shape
        buf = torch.zeros(T, Bn, 2 * D, dtype=dtype, device=dev)
        buf[..., ::2] = x.transpose(0, 1)
        x = buf.transpose(0, 1)[..., ::2]
    return x


def make_mask(shape, dev, seed=0):
    """[B, T] bool, first and last token of each sample valid."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape[:2], generator=g) > 0.4
    m[:, 0] = True
    m[:, -1] = True
    return m.to(dev)


def data(shape, dtype, seed=0):
    """x, f, mask on CPU (randn; at least two valid tokens per sample), as test_cpp_backend's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    f = (0.5 * torch.randn(*shape, generator=g)).to(dtype)
    mask = torch.rand(shape[:2], generator=g) > 0.3
    mask[:, :2] = True
    return x, f, mask


def strided_views(dtype, dev="cpu"):
    """Non-contiguous x, f of four kinds (views of tensors on dev)."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(2, 150, 97, generator=g).to(dtype).to(dev)
    fb = torch.randn(2, 150, 97, generator=g).to(dtype).to(dev)
    return {
        "transposed": (
            base.transpose(1, 2)[:, :, :80],
            fb.transpose(1, 2)[:, :, :80],
        ),  # channel stride 150
        "sliced": (base[:, ::2, 1::3], fb[:, 1::2, 1::3]),
        "batch-permuted": (
            base[:, :60].reshape(6, 20, 97).transpose(0, 1),
            fb[:, :60].reshape(6, 20, 97).transpose(0, 1),
        ),  # [20, 6, 97]
        "expanded": (base[:1, :5].expand(3, 5, 97), fb[:1, :1].expand(3, 5, 97)),  # strides 0
    }


def ref_counts(x, f, mask, bins):
    """Reference bin counts int64 [B, D, bins]."""
    y = ref_ops._y(x, f)
    out = []
    for b in range(y.shape[0]):
        idx = ref_ops.bucket_bin_index(ref_ops._rows(y, mask, b), bins)  # (N, D)
        c = torch.zeros(y.shape[2], bins, dtype=torch.int64, device=y.device)
        c.scatter_add_(1, idx.t(), torch.ones_like(idx.t()))
        out.append(c)
    return torch.stack(out)


BAD_CASES = ["clean", "nan_x", "inf_x", "nan_f", "inf_f", "inf_both", "overflow", "masked"]


def bad_data(dtype, case, shape, dev):
    """x, f, mask [B, T, D] on dev with the bad values of ``case``; the mask leaves token
    (b1, 9) out (b1 = 1, or 0 for one sample)."""
    Bn, T, D = shape
    b1 = min(1, Bn - 1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g)
    f = 0.5 * torch.randn(shape, generator=g)
    mask = torch.ones(Bn, T, dtype=torch.bool)
    mask[b1, 9] = False
    big = 3e38 if dtype != torch.float16 else 6e4
    if case == "nan_x":
        x[b1, 5, 7] = NAN
    elif case == "inf_x":
        x[0, 0, 0] = INF
        x[Bn - 1, T - 1, D - 1] = -INF
    elif case == "nan_f":
        f[b1, 5, 7] = NAN
    elif case == "inf_f":
        f[Bn - 1, 3, 4] = -INF
    elif case == "inf_both":  # Inf - Inf = NaN in Y only
        x[0, 4, 2] = INF
        f[0, 4, 2] = -INF
    elif (
        case == "overflow"
    ):  # finite x and f; Y overflows fp32 (fp16: only fp16's range, no overflow)
        x[b1, 3, 2] = big
        f[b1, 3, 2] = big
    elif case == "masked":  # bad values only in the masked-out token
        x[b1, 9, 3] = NAN
        f[b1, 9, 4] = INF
        x[b1, 9, 5] = big
        f[b1, 9, 5] = big
    return x.to(dtype).to(dev), f.to(dtype).to(dev), mask.to(dev)


def bad_channels(y, mask):
    """bool [B, D]: (sample, channel) holding a non-finite y among the valid tokens."""
    bad = ~torch.isfinite(y)
    if mask is not None:
        bad &= mask[..., None]
    return bad.any(1)


def bad_and_clean(x, f, mask):
    """(bad, clean) for ``y = x + f`` (``x`` when ``f`` is None) in float32: ``bad`` as
    :func:`bad_channels` (bool [B, D]), ``clean`` y with its non-finite values set to 0."""
    y = x.float() if f is None else x.float() + f.float()
    return bad_channels(y, mask), torch.where(torch.isfinite(y), y, torch.zeros_like(y))


def check_bad_bucket(h, bad, clean, mask, name="bucket"):
    """A bucket entropy ``h`` [B, D] of 20 bins: NaN exactly at ``bad``, elsewhere the
    reference's entropy of ``clean`` (to 1e-12)."""
    assert torch.equal(h.isnan(), bad), (
        f"{name}: NaN at {h.isnan().nonzero().tolist()}, bad {bad.nonzero().tolist()}"
    )
    assert_close(
        ref_ops.bucket(clean, None, mask, 20)[~bad],
        h[~bad],
        1e-12,
        1e-12,
        name="bucket, clean channels",
    )


def same_bits(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(
        a.nan_to_num(7.0, 8.0, 9.0), b.nan_to_num(7.0, 8.0, 9.0)
    )


# ------------------------------------------------------------------ comparisons


def check_moments(ref, out, tol: Tol, name=""):
    """A backend's moments against the reference's: count, min and max exact."""
    assert set(out) >= {"count", "mean", "m2", "min", "max"}
    if tol.f64_moments:
        assert out["mean"].dtype == torch.float64 and out["m2"].dtype == torch.float64, name
        assert out["min"].dtype == torch.float32 and out["max"].dtype == torch.float32, name
    assert_close(ref["count"], out["count"], 0, name=f"{name} count")
    assert_close(ref["min"], out["min"], 0, name=f"{name} min")
    assert_close(ref["max"], out["max"], 0, name=f"{name} max")
    assert_close(ref["m2"], out["m2"], *tol.m2, name=f"{name} m2")
    # the mean agrees to mean_rel relative, or to mean_std of the channel's spread near 0
    std = (ref["m2"] / ref["count"][:, None]).sqrt().cpu()
    err = (ref["mean"].cpu() - out["mean"].double().cpu()).abs()
    lim = tol.mean_rel * ref["mean"].abs().cpu() + tol.mean_std * std + 1e-30
    assert bool((err <= lim).all()), f"{name} mean: worst excess {(err - lim).max():.3e}"


def check_bucket(be: Backend, x, f=None, mask=None, bins=20, paper_exact=False, name=""):
    r = ref_ops.bucket(x, f, mask, bins, paper_exact)
    c = be.op("bucket")(x, f, mask, bins, paper_exact)
    assert c.dtype == torch.float64
    assert_close(r, c, rtol=1e-12, atol=1e-12, name=f"{name} bucket")


def check_bucket_cosine(be: Backend, x, other, mask=None, fused=True, bins=20, name=""):
    """The fused bucket_cosine kernel (where the backend has one) against the reference's
    bucket of Y and cosine of (x, Y): Y = x + other (fused) or Y = other."""
    k = be.op("bucket_cosine")
    if k is None:
        return
    y_in, f_in = (x, other) if fused else (other, None)
    h, s, n = (
        k(x, other, None, mask, bins, False) if fused else k(other, None, x, mask, bins, False)
    )
    assert h.dtype == s.dtype == n.dtype == torch.float64
    assert_close(ref_ops.bucket(y_in, f_in, mask, bins, False), h, rtol=1e-12, atol=1e-12,
                 name=f"{name} bucket_cosine H_d")  # fmt: skip
    rs, rc = ref_ops.cosine(x, other, mask, fused)
    assert_close(rc, n, 0, name=f"{name} bucket_cosine count")
    rtol, atol, per_token = be.tol.cosine
    assert_close(
        rs, s, rtol=rtol, atol=atol * float(rc.max()) if per_token else atol,
        name=f"{name} bucket_cosine cosine",
    )  # fmt: skip


def check_cosine(be: Backend, x, other, mask=None, fused=True, name=""):
    rs, rc = ref_ops.cosine(x, other, mask, fused)
    cs, cc = be.op("cosine")(x, other, mask, fused)
    assert_close(rc, cc, 0, name=f"{name} count")
    # a sum of cosines can cancel: cpp allows atol per valid token (the mean cosine to atol)
    rtol, atol, per_token = be.tol.cosine
    assert_close(
        rs, cs, rtol=rtol, atol=atol * float(rc.max()) if per_token else atol, name=f"{name} cosine"
    )
