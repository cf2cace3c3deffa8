"""Peak memory of the streaming runner on a random Llama checkpoint of several GB.

    python benches/stream_memory.py                 # ~5.5 GB fp32 checkpoint in a temp dir
    python benches/stream_memory.py --layers 8      # smaller and faster

Writes a random Llama-architecture checkpoint tensor by tensor into sharded safetensors
(never the whole model in memory), then measures in child processes (VmHWM):
(1) the peak resident memory of an idle Python with torch imported, (2) that of
``profile_streaming`` on the checkpoint. Prints both and the difference as a fraction of
the checkpoint size (the target in issue 5: under 25%). ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

# Peak RSS from /proc/self/status (VmHWM): it belongs to the process image, unlike
# getrusage's ru_maxrss, which Linux carries over from the parent across fork + exec.
HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
CHILD_IDLE = f"import torch; print({HWM})"
CHILD_RUN = r"""
import sys, time, torch
from entrodrop_fast.profile.inmemory import ProfileSettings
from entrodrop_fast.profile.layerwise import profile_streaming
torch.set_num_threads(2)
d, samples, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
w = torch.randint(0, 32000, (samples, seq), generator=torch.Generator().manual_seed(0))
t = time.perf_counter()
settings = ProfileSettings(methods=("bucket",), batch_size=4)
res = profile_streaming(d, w, settings, ram_budget_bytes=64 * 2**20, progress=False)
print(HWM_EXPR, time.perf_counter() - t, res["checkpoint_bytes"])
""".replace("HWM_EXPR", HWM)


def write_checkpoint(
    path: str, layers: int, hidden: int, inter: int, vocab: int, shard_bytes: float
) -> int:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    weight_map, shard, shard_size, n_shards, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_size, n_shards
        if shard:
            n_shards += 1
            name = f"model-{n_shards:05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_size = {}, 0

    for name, p in skeleton.state_dict().items():
        t = (
            torch.ones(p.shape)
            if name.endswith("norm.weight")
            else torch.randn(p.shape, generator=g) * 0.02
        )
        shard[name] = t
        shard_size += t.numel() * 4
        total += t.numel() * 4
        if shard_size >= shard_bytes:
            flush()
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument(
        "--dir", help="where to write the checkpoint (default: a temp dir, removed afterwards)"
    )
    ap.add_argument("--json", help="write the measured numbers here")
    args = ap.parse_args()
    path = args.dir or tempfile.mkdtemp(prefix="entrodrop-bigckpt-")
    os.makedirs(path, exist_ok=True)
    try:
        t = time.perf_counter()
        total = write_checkpoint(
            path, args.layers, args.hidden, args.intermediate, args.vocab, 1 << 30
        )
        print(
            f"checkpoint: {total / 2**30:.2f} GiB in {path} "
            f"(written in {time.perf_counter() - t:.0f} s)"
        )
        idle = int(
            subprocess.run(
                [sys.executable, "-c", CHILD_IDLE], check=True, capture_output=True, text=True
            ).stdout.split()[-1]
        )
        out = subprocess.run(
            [sys.executable, "-c", CHILD_RUN, path, str(args.samples), str(args.seq_len)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        peak, seconds = int(out[-3]), float(out[-2])
        extra = peak - idle
        res = {
            "checkpoint_bytes": total,
            "idle_torch_rss_bytes": idle,
            "streaming_peak_rss_bytes": peak,
            "extra_bytes": extra,
            "extra_fraction_of_checkpoint": extra / total,
            "seconds": seconds,
            "layers": args.layers,
            "hidden": args.hidden,
            "samples": args.samples,
            "seq_len": args.seq_len,
        }
        print(
            f"idle python+torch peak RSS {idle / 2**20:.0f} MiB; "
            f"streaming profile peak RSS {peak / 2**20:.0f} MiB "
            f"(+{extra / 2**20:.0f} MiB = {100 * extra / total:.1f}% of the checkpoint) "
            f"in {seconds:.1f} s"
        )
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=2)
        return 0
    finally:
        if not args.dir:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
