"""Big-model figures of the streaming profiler: random checkpoints, profiled in memory, with
``--streaming`` and with ``--max-memory``; peak memory, time per layer, ratios. Driven by
``benches/gpu_bigmodel.sh`` (which documents the GPU run); usable alone:

    python benches/bigmodel.py --preset dry-run --out out/          # tiny shapes on the CPU (CI)
    python benches/bigmodel.py --preset h200 --device cuda --out out/
    # peak RSS of a small Mixtral:
    python benches/bigmodel.py --preset cpu-moe --device cpu --out out/

For each model of the preset it writes a random checkpoint tensor by tensor (never the whole
model in memory; Mixtral-shaped ones per expert, as published, through transformers' own
reverse conversion, or fused with ``--layout fused``), a byte-level tokenizer beside it, and
runs ``entrodrop profile`` (the CLI's own code, in a child process per run) in each mode.
A child reports the peak memory it reached: on CUDA ``torch.cuda.max_memory_allocated``, on
the CPU the peak resident set (VmHWM) less that of an idle child that imported the same
libraries and built the model's classes (on ``meta``). Writes ``bigmodel.json`` and
``bigmodel.md`` into ``--out``, and prints the table.
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

GiB = 2**30

# name -> (model_type, config fields); hidden sizes etc. as the real models, fewer layers where
# noted
LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)
MIXTRAL_8X7B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)
PRESETS = {
    # Llama-3-8B layer shapes, 32 layers (16 GB bf16); Mixtral-8x7B layer shapes, 4 layers
    # (12 GB bf16)
    "h200": {
        "dtype": "bf16",
        "samples": 128,
        "seq_len": 256,
        "shard_bytes": 4 * GiB,
        "models": {
            "llama3-8b-shapes": ("llama", {**LLAMA3_8B, "num_hidden_layers": 32}, "8GB"),
            "mixtral-8x7b-shapes-4l": ("mixtral", {**MIXTRAL_8X7B, "num_hidden_layers": 4}, "8GB"),
        },
    },
    # a small Mixtral on the CPU: D 1024, 8 experts of 3584, 4 layers (1.5 GB fp32)
    "cpu-moe": {
        "dtype": "fp32",
        "samples": 8,
        "seq_len": 128,
        "shard_bytes": GiB / 2,
        "models": {
            "mixtral-small": (
                "mixtral",
                dict(
                    hidden_size=1024,
                    intermediate_size=3584,
                    num_attention_heads=8,
                    num_key_value_heads=2,
                    vocab_size=32000,
                    num_local_experts=8,
                    num_experts_per_tok=2,
                    num_hidden_layers=4,
                    tie_word_embeddings=False,
                ),
                "1GB",
            ),
        },
    },
    # tiny shapes for CI: everything runs in seconds on a CPU
    # (--max-memory: below the checkpoint, above one layer + fusing + a batch)
    "dry-run": {
        "dtype": "fp32",
        "samples": 6,
        "seq_len": 32,
        "shard_bytes": 2**17,
        "models": {
            "llama-tiny": (
                "llama",
                dict(
                    hidden_size=64,
                    intermediate_size=128,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    vocab_size=512,
                    num_hidden_layers=4,
                    tie_word_embeddings=False,
                ),
                "600KB",
            ),
            "mixtral-tiny": (
                "mixtral",
                dict(
                    hidden_size=64,
                    intermediate_size=96,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    vocab_size=512,
                    num_local_experts=4,
                    num_experts_per_tok=2,
                    num_hidden_layers=2,
                    tie_word_embeddings=False,
                ),
                "850KB",
            ),
        },
    },
}
MODES = ("in_memory", "streaming", "max_memory")


# ------------------------------------------------------------------ the checkpoint


def checkpoint_tensors(model_type: str, fields: dict, layout: str):
    """(config, [(name, shape)]) of the checkpoint: the model's own tensors when fused, else the
    names and shapes transformers' ``save_pretrained`` writes (per expert for MoE), in order."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from entrodrop_fast.profile.layerwise import natural_key

    config = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if layout == "per_expert":
        try:
            from transformers.core_model_loading import revert_weight_conversion
        except ImportError:  # transformers < 5: the model's own names are the per-expert ones
            pass
        else:
            state = revert_weight_conversion(
                model, state
            )  # runs on meta tensors: names and shapes only
    return config, [(k, list(state[k].shape)) for k in sorted(state, key=natural_key)]


def write_checkpoint(
    path: str, model_type: str, fields: dict, layout: str, dtype: str, shard_bytes: float = 4 * GiB
) -> dict:
    """A random checkpoint in ``path``, written shard by shard; returns its description."""
    import torch
    from safetensors.torch import save_file

    from entrodrop_fast.models.loading import parse_dtype

    config, tensors = checkpoint_tensors(model_type, fields, layout)
    dt = parse_dtype(dtype)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers are made faster there
    gen = torch.Generator(device=dev).manual_seed(0)
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    weight_map, shard, size, total = {}, {}, 0, 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for name, shape in tensors:
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t = torch.ones(shape, dtype=dt)
        else:
            t = (
                (torch.randn(shape, generator=gen, device=dev, dtype=torch.float32) * 0.02)
                .to(dt)
                .cpu()
            )
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    _write_tokenizer(path)
    return {
        "bytes": total,
        "tensors": len(tensors),
        "shards": len(set(weight_map.values())),
        "layout": layout,
        "per_expert_names": sum(".experts.0." in n for n, _ in tensors),
    }


def _write_tokenizer(path: str) -> None:
    """A byte-level word tokenizer (printable ASCII -> ids 1..96): no download needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(
        models.WordLevel(
            vocab={chr(i): i - 31 for i in range(32, 127)} | {"~unk": 0}, unk_token="~unk"
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="~unk").save_pretrained(path)


# ------------------------------------------------------------------ one run, in a child process

HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
CHILD = r"""
import json, sys, time
import torch, transformers
import entrodrop_fast.profile.layerwise, entrodrop_fast.cli
args, device = json.loads(sys.argv[1]), sys.argv[2]
# the idle baseline: the same imports and the model's classes (built on meta), no work
if args is None:
    entrodrop_fast.profile.layerwise.build_skeleton(sys.argv[4], torch.float32)
    print("RESULT", json.dumps({"rss_bytes": HWM_EXPR}))
    sys.exit(0)
torch.set_num_threads(int(sys.argv[3]))
if device.startswith("cuda"):
    torch.cuda.init()
    torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
rc = entrodrop_fast.cli.main(args)
wall = time.perf_counter() - t
out = {"rc": rc, "wall_seconds": wall, "rss_bytes": HWM_EXPR}
if device.startswith("cuda"):
    out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    out["cuda_reserved_peak_bytes"] = torch.cuda.max_memory_reserved()
print("RESULT", json.dumps(out))
""".replace("HWM_EXPR", HWM)


def run_child(args: list[str] | None, device: str, threads: int, ckpt: str = "") -> dict:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args), device, str(threads), ckpt],
        capture_output=True,
        text=True,
    )
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(
            f"profile {' '.join(args or [])} failed (exit {r.returncode}):\n{r.stderr[-3000:]}"
        )
    res = json.loads(line[len("RESULT ") :])
    if res.get("rc", 0) != 0:
        raise RuntimeError(
            f"profile {' '.join(args or [])} exited {res['rc']}:\n{r.stderr[-3000:]}"
        )
    return res


def profile_args(
    ckpt: str,
    mode: str,
    preset: dict,
    device: str,
    out: str,
    batch_size: int | None,
    max_memory: str,
) -> list[str]:
    args = [
        "profile",
        ckpt,
        "--samples",
        str(preset["samples"]),
        "--seq-len",
        str(preset["seq_len"]),
        "--dtype",
        preset["dtype"],
        "--device",
        device,
        "--out",
        out,
        "--overwrite",
        "-q",
        "--no-plot",
        "-m",
        "bucket",
    ]
    if batch_size:
        args += ["--batch-size", str(batch_size)]
    if mode == "streaming":
        args.append("--streaming")
    elif mode == "max_memory":
        args += ["--max-memory", max_memory]
    return args


# ------------------------------------------------------------------ the formula


def formula(
    model_type: str, fields: dict, dtype: str, batch: int, seq_len: int, samples: int, layout: str
) -> dict:
    """The README's streamed peak-memory formula, term by term (bytes)."""
    b = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
    D, Im, V = fields["hidden_size"], fields["intermediate_size"], fields["vocab_size"]
    h = fields["num_attention_heads"]
    dh = fields.get("head_dim") or D // h
    kv = fields.get("num_key_value_heads", h)
    E = fields.get("num_local_experts", 0)
    k = fields.get("num_experts_per_tok", 1)
    attn = 2 * D * h * dh + 2 * D * kv * dh
    experts = (E * 3 * D * Im + E * D) if E else 3 * D * Im
    layer = (attn + experts + 2 * D) * b
    embed = V * D * b
    act_inter = (k * (D + Im)) if E else Im
    batch_bytes = batch * seq_len * (D + act_inter) * 4 * 3
    fuse = (E * 2 * Im * D * b) if (E and layout == "per_expert") else 0
    buffers = 2 * samples * seq_len * D * b
    return {
        "layer": layer,
        "embedding": embed,
        "batch": batch_bytes,
        "fuse": fuse,
        "buffers": buffers,
        "device_peak": max(embed, layer) + batch_bytes,
        "cpu_rss": max(embed, 2 * layer + fuse) + batch_bytes + buffers,
    }


# ------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="dry-run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True, help="directory for bigmodel.json / bigmodel.md")
    ap.add_argument(
        "--dir", help="where to write the checkpoints (default: a temp dir, removed afterwards)"
    )
    ap.add_argument(
        "--layout",
        choices=["per_expert", "fused", "both"],
        default="per_expert",
        help="MoE checkpoint layout (default per_expert, as published)",
    )
    ap.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}"
    )
    ap.add_argument("--models", default=None, help="comma-separated subset of the preset's models")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="default: 1 (in memory, --streaming), the plan's choice (--max-memory)",
    )
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    args = ap.parse_args()
    preset = dict(PRESETS[args.preset])
    if args.samples:
        preset["samples"] = args.samples
    if args.seq_len:
        preset["seq_len"] = args.seq_len
    modes = [m for m in args.modes.split(",") if m]
    models = {
        k: v for k, v in preset["models"].items() if not args.models or k in args.models.split(",")
    }
    os.makedirs(args.out, exist_ok=True)
    root = args.dir or tempfile.mkdtemp(prefix="entrodrop-bigmodel-")
    os.makedirs(root, exist_ok=True)
    import torch
    import transformers

    results = {
        "preset": args.preset,
        "device": args.device,
        "dtype": preset["dtype"],
        "samples": preset["samples"],
        "seq_len": preset["seq_len"],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        "models": {},
    }
    try:
        # first-call costs (Triton compiling its kernels into its disk cache, lazy imports) paid
        # here
        if args.preset != "dry-run":
            model_type, fields, _ = PRESETS["dry-run"]["models"]["llama-tiny"]
            warm = os.path.join(root, "warm-up")
            write_checkpoint(warm, model_type, fields, "fused", preset["dtype"])
            t = time.perf_counter()
            run_child(
                profile_args(
                    warm,
                    "streaming",
                    {**preset, "samples": 4, "seq_len": 32},
                    args.device,
                    warm + "-report",
                    None,
                    "",
                ),
                args.device,
                args.threads,
            )
            print(
                f"[warm-up] tiny model profiled on {args.device} in "
                f"{time.perf_counter() - t:.1f} s",
                flush=True,
            )
            shutil.rmtree(warm, ignore_errors=True)
            shutil.rmtree(warm + "-report", ignore_errors=True)
        for name, (model_type, fields, max_memory) in models.items():
            layouts = (
                (["per_expert", "fused"] if args.layout == "both" else [args.layout])
                if "num_local_experts" in fields
                else ["dense"]
            )
            for layout in layouts:
                key = name if len(layouts) == 1 else f"{name}-{layout}"
                ckpt = os.path.join(root, key)
                t = time.perf_counter()
                info = write_checkpoint(
                    ckpt,
                    model_type,
                    fields,
                    "fused" if layout == "dense" else layout,
                    preset["dtype"],
                    preset["shard_bytes"],
                )
                info["write_seconds"] = time.perf_counter() - t
                print(
                    f"[{key}] checkpoint {info['bytes'] / GiB:.2f} GiB, {info['shards']} shards "
                    f"({info['write_seconds']:.0f} s)",
                    flush=True,
                )
                idle = run_child(None, "cpu", args.threads, ckpt)["rss_bytes"]
                entry = {
                    "model_type": model_type,
                    "config": fields,
                    "checkpoint": info,
                    "max_memory": max_memory,
                    "idle_rss_bytes": idle,
                    "runs": {},
                }
                for mode in modes:
                    report_dir = os.path.join(root, f"{key}-{mode}-report")
                    res = run_child(
                        profile_args(
                            ckpt, mode, preset, args.device, report_dir, args.batch_size, max_memory
                        ),
                        args.device,
                        args.threads,
                    )
                    report = json.load(open(os.path.join(report_dir, "report.json")))
                    L = report["model"]["num_layers"]
                    res.update(
                        {
                            "kind": report["model"]["kind"],
                            "batch_size": report["settings"]["batch_size"],
                            "profile_seconds": report["timing"]["seconds"],
                            "seconds_per_layer": report["timing"]["seconds"] / L,
                            "load_seconds": report["timing"].get("load_seconds"),
                            "layers": L,
                            "rss_extra_bytes": res["rss_bytes"] - idle,
                        }
                    )
                    res["formula"] = formula(
                        model_type,
                        fields,
                        preset["dtype"],
                        res["batch_size"],
                        preset["seq_len"],
                        preset["samples"],
                        layout,
                    )
                    entry["runs"][mode] = res
                    peak = res.get("cuda_peak_bytes", res["rss_extra_bytes"])
                    print(
                        f"[{key}] {mode}: {res['kind']}, batch {res['batch_size']}, "
                        f"{res['profile_seconds']:.1f} s profile "
                        f"({res['seconds_per_layer']:.2f} s/layer), "
                        f"wall {res['wall_seconds']:.1f} s, peak {peak / GiB:.2f} GiB",
                        flush=True,
                    )
                    shutil.rmtree(report_dir, ignore_errors=True)
                base = entry["runs"].get("in_memory")
                for res in entry["runs"].values():
                    if base:
                        res["profile_ratio_to_in_memory"] = (
                            res["profile_seconds"] / base["profile_seconds"]
                        )
                        res["wall_ratio_to_in_memory"] = res["wall_seconds"] / base["wall_seconds"]
                results["models"][key] = entry
                shutil.rmtree(ckpt, ignore_errors=True)
                write_results(
                    results, args.out
                )  # after every model: a run cut short keeps what it has
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(write_results(results, args.out))
    return 0


def write_results(results: dict, out: str) -> str:
    with open(os.path.join(out, "bigmodel.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    md = markdown(results)
    with open(os.path.join(out, "bigmodel.md"), "w") as fh:
        fh.write(md)
    return md


def markdown(results: dict) -> str:
    cuda = results["device"].startswith("cuda")
    peak_name = "peak GPU memory (max_memory_allocated)" if cuda else "peak RSS above idle"
    lines = [
        f"Device {results['gpu'] or 'cpu'}, {results['dtype']}, "
        f"{results['samples']} x {results['seq_len']} tokens, "
        f"torch {results['torch']}, transformers {results['transformers']}.",
        "",
        "| model | checkpoint | mode | batch | profile s | s / layer | wall s "
        f"| × in memory (profile / wall) | {peak_name} | formula |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in results["models"].items():
        size = f"{entry['checkpoint']['bytes'] / GiB:.2f} GiB, {entry['checkpoint']['layout']}"
        for mode, r in entry["runs"].items():
            peak = r.get("cuda_peak_bytes", r["rss_extra_bytes"])
            f = r["formula"]
            predicted = (
                (f["device_peak"] if cuda else f["cpu_rss"]) if r["kind"] == "streaming" else None
            )
            ratio = (
                f"{r['profile_ratio_to_in_memory']:.2f} / {r['wall_ratio_to_in_memory']:.2f}"
                if "profile_ratio_to_in_memory" in r
                else "—"
            )
            what = f"max_memory {entry['max_memory']}" if mode == "max_memory" else mode
            formula = "—" if predicted is None else f"{predicted / GiB:.3f} GiB"
            lines.append(
                f"| {key} | {size} | {what} ({r['kind']}) | {r['batch_size']} "
                f"| {r['profile_seconds']:.1f} | {r['seconds_per_layer']:.3f} | "
                f"{r['wall_seconds']:.1f} | {ratio} | {peak / GiB:.3f} GiB | {formula} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
