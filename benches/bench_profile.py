"""Profile overhead: plain forward vs forward + taps + estimators vs the paper's approach.

    python benches/bench_profile.py                      # built-in SmolLM2, 8 x 256, bs 1, CPU
    python benches/bench_profile.py --samples 16 --batch-size 8 --device cuda --out DIR
    python benches/bench_profile.py --methods bucket,gaussian_diag,knn,cosine --paper-reps 0
    # 8B-shaped:
    python benches/bench_profile.py --random-llama 8 --dtype bf16 --device cuda --batch-size 8

Three providers run on the same token batches, interleaved round by round (so a busy
machine slows them alike), through the decoder stack only (no LM head), under
``torch.inference_mode``:

- ``plain``: the forward pass alone;
- ``taps``: the forward with :class:`~entrodrop_fast.profile.taps.ResidualTaps` feeding
  :class:`~entrodrop_fast.profile.taps.BlockStatistics` (``--methods``, default bucket: the
  entropy of the 2L + 1 residual points, each measured once, and cosine per block when
  asked; backend ``--backend``, default auto);
- ``paper``: the paper's approach, its estimator as plain torch code inside the forward:
  per block and per sample, H(X) and H(Y) with the one-hot histogram
  (:func:`entrodrop_fast.bucket_onehot_reference`), Y = X + F materialised, nothing shared.

Each batch runs under the three providers back to back. Reported: per provider the minimum
and median seconds per batch, and the overhead over ``plain`` as the median of the per-batch
ratios (robust to a machine whose load changes during the run), as min / min, and as the
median ratio of process CPU time (on a shared CPU machine the least disturbed by others).
Writes bench_profile.json to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class PaperSink:
    """The paper's approach: H(X) and H(Y) of every block, one-hot bucket per sample, in torch."""

    def __init__(self, bins: int):
        from entrodrop_fast import bucket_onehot_reference

        self.h = bucket_onehot_reference
        self.bins = bins
        self.values: list[torch.Tensor] = []

    def _block(self, x, y):
        for b in range(x.shape[0]):
            self.values.append(self.h(y[b], self.bins) - self.h(x[b], self.bins))

    def on_input(self, li, r):
        pass

    def on_attn(self, li, x, f):
        self._block(x, x + f)

    def on_mid(self, li, x, m):
        pass

    def on_mlp(self, li, x, f):
        self._block(x, x + f)

    def on_output(self, li, x, y):
        self._block(x, y)


def random_llama(layers: int, dtype: str, device: torch.device, shape: str = "4096,14336,32,8"):
    """A randomly initialised Llama of ``layers`` layers; ``shape`` = hidden,mlp,heads,kv_heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, mlp, heads, kv = (int(v) for v in shape.split(","))
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_hidden_layers=layers,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dt)
    return model.eval()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default=None, help="model source (default: built-in SmolLM2-135M-Instruct)"
    )
    ap.add_argument(
        "--methods",
        default="bucket",
        help="what the taps measure, comma-separated as for `entrodrop profile --method` "
        "(default bucket; e.g. bucket,gaussian_diag,knn,cosine)",
    )
    ap.add_argument(
        "--random-llama",
        type=int,
        default=0,
        metavar="LAYERS",
        help="instead of --model: a random Llama of LAYERS decoder layers, random token ids",
    )
    ap.add_argument(
        "--llama-shape",
        default="4096,14336,32,8",
        metavar="HIDDEN,MLP,HEADS,KV_HEADS",
        help="its layer shape (default Llama-3.1-8B's: 4096,14336,32,8)",
    )
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--bins", type=int, default=20)
    ap.add_argument(
        "--reps", type=int, default=3, help="rounds (each runs every provider over all samples)"
    )
    ap.add_argument(
        "--paper-reps", type=int, default=1, help="rounds that include the (slow) paper provider"
    )
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: torch's choice)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from entrodrop_fast.data import calibration_windows
    from entrodrop_fast.models import get_adapter, load_model
    from entrodrop_fast.ops.bench import time_calls
    from entrodrop_fast.profile.inmemory import ProfileSettings, resolved_backend
    from entrodrop_fast.profile.taps import BlockStatistics, ResidualTaps

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if args.random_llama:
        model, source = (
            random_llama(args.random_llama, args.dtype, dev, args.llama_shape),
            f"random llama {args.llama_shape} x {args.random_llama} layers",
        )
        gen = torch.Generator().manual_seed(0)
        windows = torch.randint(
            0, model.config.vocab_size, (args.samples, args.seq_len), generator=gen
        )
    else:
        lm = load_model(args.model, dtype=args.dtype, device=args.device)
        model, source = lm.model, lm.source
        windows, _ = calibration_windows(lm.tokenizer, samples=args.samples, seq_len=args.seq_len)
    ad = get_adapter(model)
    L = ad.num_layers(model)
    backend = resolved_backend(args.backend, dev)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    ts = ProfileSettings(methods=methods, bins=args.bins, backend=backend).tap_settings()
    ts.backend = backend

    st = BlockStatistics(ad, L, ts)
    paper_sink = PaperSink(args.bins)
    batches = [
        windows[i : i + args.batch_size].to(dev) for i in range(0, args.samples, args.batch_size)
    ]
    base = ad.base(model)

    def forward(ids, on_batch=None):
        base(input_ids=ids, use_cache=False)
        if on_batch is not None:
            on_batch()
        sync(dev)

    def timed(fn, *a):
        c = time.process_time()
        wall = time_calls(lambda: fn(*a), 1, warmup=0)[0]  # fn synchronizes the device itself
        cpu[0] = time.process_time() - c
        return wall

    cpu = [0.0]  # process CPU seconds of the last timed call (CPU runs: robust to other load)

    # Each batch runs under every provider back to back, so a machine whose load changes
    # over the run slows them alike; the overhead is the median of per-batch ratios.
    times: dict[str, list[float]] = {"plain": [], "taps": [], "paper": []}
    ratios: dict[str, list[float]] = {"taps": [], "paper": []}
    cpu_ratios: dict[str, list[float]] = {"taps": [], "paper": []}
    with torch.inference_mode():
        forward(batches[0])  # warm-up
        with ResidualTaps(model, st, ad):
            forward(batches[0], st.end_batch)
        for rnd in range(args.reps):
            for ids in batches:
                tp = timed(forward, ids)
                cp = cpu[0]
                with ResidualTaps(model, st, ad):  # registering ~5 hooks per layer: not timed
                    tt = timed(forward, ids, st.end_batch)
                cpu_ratios["taps"].append(cpu[0] / cp)
                times["plain"].append(tp)
                times["taps"].append(tt)
                ratios["taps"].append(tt / tp)
                if rnd < args.paper_reps:
                    with ResidualTaps(model, paper_sink, ad):
                        tq = timed(forward, ids)
                    times["paper"].append(tq)
                    ratios["paper"].append(tq / tp)
                    cpu_ratios["paper"].append(cpu[0] / cp)
            print(
                f"round {rnd}: plain {statistics.median(times['plain']):.4f} s/batch, "
                f"taps overhead {statistics.median(ratios['taps']) - 1:.1%}"
                + (
                    f", paper overhead {statistics.median(ratios['paper']) - 1:.1%}"
                    if ratios["paper"]
                    else ""
                ),
                flush=True,
            )
    best = {k: min(v) for k, v in times.items() if v}
    med = {k: statistics.median(v) for k, v in times.items() if v}
    res = {
        "model": source,
        "methods": list(methods),
        "num_layers": L,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "bins": args.bins,
        "backend": backend,
        "dtype": args.dtype,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "seconds_per_batch_min": best,
        "seconds_per_batch_median": med,
        "overhead_median_of_batch_ratios": {
            k: statistics.median(v) - 1 for k, v in ratios.items() if v
        },
        "overhead_min_over_min": {k: best[k] / best["plain"] - 1 for k in best if k != "plain"},
        "overhead_cpu_time_median_ratio": {
            k: statistics.median(v) - 1 for k, v in cpu_ratios.items() if v
        },
    }
    print(
        f"\n{source}: {L} layers, {args.samples} x {args.seq_len} tokens, "
        f"batch {args.batch_size}, {args.device}, "
        f"{res['threads']} threads, taps {','.join(methods)} on backend {backend}"
    )
    print(
        f"{'provider':8s} {'min s/batch':>12s} {'median':>10s} "
        f"{'overhead (median ratio)':>24s} {'(min/min)':>10s} {'(CPU time)':>11s}"
    )
    for k in best:
        o1 = res["overhead_median_of_batch_ratios"].get(k, 0.0)
        o2 = res["overhead_min_over_min"].get(k, 0.0)
        o3 = res["overhead_cpu_time_median_ratio"].get(k, 0.0)
        print(f"{k:8s} {best[k]:12.4f} {med[k]:10.4f} {o1:23.1%} {o2:10.1%} {o3:11.1%}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_profile.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
