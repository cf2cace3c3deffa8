"""Named configurations: ``--preset paper`` = what the paper's own code runs.

The product's default (bucket entropy, 20 bins, batch 8 where it does not matter, stage 1
detected from the profile + the last layer protected) is *not* what EntroDrop's official
code runs on Llama. That code (the paper's official repository, read) scores

- Llama-family models (every architecture here except Mistral / Mixtral) with **knn,
  k = 25, paper form** (ln N - ln k) on the fp16 model, batch 1;
- Mistral with **bucket, 80 bins**;

and protects **layers 0, 1 and the last, fixed** (no stage-1 detection).

:func:`paper_preset` returns that configuration for a model type. On a CPU the model runs
in fp32 instead of fp16: torch's CPU fp16 kernels are slow or emulated, and the estimators
read every dtype as fp32 anyway, so the only difference is the rounding of the activations
(the paper's fp16 model rounds each residual to 11 bits). On CUDA the preset asks for fp16.
"""

from __future__ import annotations

from entrodrop_fast._names import setting

PRESETS = ("paper",)
PAPER_KNN_K = 25
PAPER_BUCKET_BINS_MISTRAL = 80


def paper_protected(num_layers: int) -> list[int]:
    """The paper's fixed rule: layers 0, 1 and the last (0-based), those that exist."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return sorted({i for i in (0, 1, num_layers - 1) if 0 <= i < num_layers})


def paper_preset(
    model_type: str | None, num_layers: int | None = None, device: str = "cpu"
) -> dict:
    """The paper's configuration for ``model_type`` on ``device``.

    Returns a dict: ``method`` ("knn" or "bucket"), ``k`` (knn neighbour rank), ``bins``
    (bucket bins), ``form`` ("paper"), ``batch_size`` (1), ``dtype`` ("fp16" on CUDA, "fp32"
    on CPU), ``protect_rule`` ("paper") and, when ``num_layers`` is given, ``protect``
    (layers 0, 1 and the last), plus ``why`` (one line saying which branch applied).
    """
    from entrodrop_fast.models.adapters import paper_family

    mt = (model_type or "").lower()
    mistral = paper_family(mt) == "mistral"
    cuda = str(device).startswith("cuda")
    out = {
        "preset": "paper",
        "method": "bucket" if mistral else "knn",
        "k": PAPER_KNN_K,
        "bins": PAPER_BUCKET_BINS_MISTRAL if mistral else 20,
        "form": "paper",
        "batch_size": 1,
        "dtype": "fp16" if cuda else "fp32",
        "protect_rule": "paper",
        "why": (
            f"{mt or 'unknown type'}: "
            + (
                "the paper's Mistral code (bucket, 80 bins)"
                if mistral
                else "the paper's Llama code (knn, k = 25, paper form)"
            )
            + (
                "; fp16 model as the paper"
                if cuda
                else "; fp32 model on CPU (the paper ran fp16 on a GPU)"
            )
            + "; layers 0, 1 and the last protected"
        ),
    }
    if num_layers is not None:
        out["protect"] = paper_protected(int(num_layers))
    return out


def preset_for_model(model, device: str = "cpu", cache_dir=None) -> dict:
    """:func:`paper_preset` for a model given by its config (a dict or a transformers config)
    or by a source (a local directory or a built-in name, whose config.json is read without
    loading weights). Raises ValueError when the source has no config at hand (a GGUF file or
    a hub name: give a local directory or a built-in name)."""
    if isinstance(model, dict) or hasattr(model, "model_type"):
        get = model.get if isinstance(model, dict) else lambda k: getattr(model, k, None)
        return paper_preset(get("model_type"), get("num_hidden_layers"), device)
    from entrodrop_fast.models.loading import peek_config

    cfg = peek_config(model, cache_dir)
    if cfg is None:
        raise ValueError(
            f"{setting('preset', python='preset')} paper reads the architecture from the model's "
            f"config.json: give a local model directory or a built-in name, not {model!r}"
        )
    return paper_preset(cfg.get("model_type"), cfg.get("num_hidden_layers"), device)


def check_preset(name) -> str | None:
    """``None`` -> None; ``"paper"`` -> "paper"; anything else: ValueError listing the presets."""
    if name is None:
        return None
    s = str(name).strip().lower()
    if s not in PRESETS:
        raise ValueError(f"unknown {setting('preset')} {name!r}; choose from {', '.join(PRESETS)}")
    return s


def report_preset(report: dict) -> str | None:
    """The preset a report was profiled with (``settings.preset``), or None."""
    return (report.get("settings") or {}).get("preset")
