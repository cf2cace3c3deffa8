"""Multi-process profiling: calibration samples sharded over ranks, states merged.

Launched with ``torchrun --nproc-per-node N -m entrodrop_fast profile ...`` (or any
launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``): each rank
profiles ``windows[rank::world]`` and the per-block statistics are merged in rank order
with Chan's formulas (gloo on CPU, NCCL on GPU), so every rank ends with the report of
the whole calibration set; rank 0 writes it.
"""

from __future__ import annotations

import os

import torch


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device) -> bool:
    """Join the process group described by the environment (torchrun); False when single-process."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (
        dist.is_available() and dist.is_initialized()
    ):
        return dist.is_available() and dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    # leave the group cleanly at exit: a process that ends with it still open can abort
    # ("terminate called without an active exception") while gloo's threads shut down
    import atexit

    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return True


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows: every world-th one, starting at its rank."""
    rank, size = world()
    mine = windows[rank::size]
    if mine.shape[0] == 0:
        raise ValueError(
            f"{windows.shape[0]} calibration samples cannot be shared by {size} processes"
        )
    return mine


def merge_block_stats_(stats) -> None:
    """Merge a BlockStatistics across ranks in place (every rank ends with the total)."""
    from entrodrop_fast.ops.states import _device_of, _to_device, gather_state_dicts

    if world()[1] == 1:
        return
    local = stats.state_dict()
    parts = gather_state_dicts(local)
    stats.load_state_dict(parts[0])
    for d in parts[1:]:
        other = type(stats).__new__(type(stats))
        other.load_state_dict(d)
        stats.merge(other)
    stats.load_state_dict(_to_device(stats.state_dict(), _device_of(local)))
