"""Run lm-evaluation-harness tasks on a (pruned) model, when ``lm_eval`` and its data are there.

The model object is handed to lm-eval's Hugging Face wrapper as it is, so attention- or
MLP-dropped models (whose modeling code lives in this package or in their directory) are
evaluated exactly as they run here.
"""

from __future__ import annotations


class LmEvalUnavailable(RuntimeError):
    """lm-evaluation-harness or its datasets cannot be used here; the message says why."""


def run_lm_eval(model, tokenizer, tasks: list[str], *, batch_size: int = 8, limit: int | None = None) -> list[dict]:
    """Accuracy per task (acc_norm where the task has it, else acc) with its standard error."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise LmEvalUnavailable("lm-evaluation-harness is not installed (pip install lm-eval); the built-in tasks need nothing") from None
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
    except Exception as exc:
        raise LmEvalUnavailable(f"lm-eval could not run {', '.join(tasks)} ({type(exc).__name__}: {exc}); its datasets come from the Hugging Face hub, which may be unreachable") from exc
    rows = []
    for task, res in out["results"].items():
        key = "acc_norm,none" if "acc_norm,none" in res else "acc,none"
        rows.append({"task": task, "accuracy": res.get(key), "stderr": res.get(key.replace(",", "_stderr,")), "metric": key.split(",")[0], "source": "lm_eval"})
    return rows
