"""Stage 3 of the pipeline: how much a pruned model keeps.

The entry point is :func:`evaluate_model` (:mod:`.pipeline`). Inside:

- :mod:`.heldout` perplexity, the built-in zero-shot tasks and generation speed on the
  corpus's held-out documents;
- :mod:`.lm_eval` lm-evaluation-harness tasks;
- :mod:`.compare` methods side by side: profile once, prune each (method, K), evaluate;
- :mod:`.paired` paired tests on the same items (McNemar, paired NLL differences).
"""

from entrodrop_fast.evaluate.pipeline import evaluate_model

__all__ = ["evaluate_model"]
