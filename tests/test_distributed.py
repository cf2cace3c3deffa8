"""States merge across torch.distributed ranks (2 CPU processes on gloo)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import entrodrop_fast as ef
from entrodrop_fast.ops.states import all_reduce_


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, x, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = x[rank::world]  # this rank's share of the samples
        stats, moments, meter = (
            ef.SampleStats((2,)),
            ef.MomentState(x.shape[-1]),
            ef.EntropyMeter("bucket", bins=8),
        )
        stats.update(torch.stack([ef.gaussian_diag_entropy(mine), ef.bucket_entropy(mine)], 1))
        moments.update(mine, backend="torch")
        meter.update(mine, backend="torch")
        for s in (stats, moments, meter):
            all_reduce_(s)
        torch.save(
            {
                "stats": stats.state_dict(),
                "moments": moments.state_dict(),
                "meter": meter.state_dict(),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    x = torch.randn(7, 40, 5)
    mp.spawn(_worker, args=(2, _free_port(), x, str(tmp_path)), nprocs=2, join=True)
    one_stats = ef.SampleStats((2,)).update(
        torch.stack([ef.gaussian_diag_entropy(x), ef.bucket_entropy(x)], 1)
    )
    one_moments = ef.MomentState(5).update(x, backend="torch")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        s = ef.SampleStats.from_state_dict(got["stats"]).result()
        assert s["n"] == 7
        torch.testing.assert_close(s["mean"], one_stats.result()["mean"], rtol=1e-12, atol=0)
        torch.testing.assert_close(s["stderr"], one_stats.result()["stderr"], rtol=1e-10, atol=0)
        m = ef.MomentState.from_state_dict(got["moments"]).result()
        torch.testing.assert_close(m["var"], one_moments.result()["var"], rtol=1e-10, atol=0)
        meter = ef.EntropyMeter.from_state_dict(got["meter"]).result()
        assert meter["n"] == 7
        torch.testing.assert_close(
            meter["mean"], ef.bucket_entropy(x, bins=8).mean(), rtol=1e-12, atol=0
        )


def test_all_reduce_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        all_reduce_(ef.SampleStats())


def test_sample_stats_shape_errors_name_the_shape_plainly():
    with pytest.raises(ValueError, match=r"shape \[B\] \(B samples\), got \[2, 5\]$"):
        ef.SampleStats().update(torch.zeros(2, 5))  # it read "shape [B, ]"
    with pytest.raises(ValueError, match=r"shape \[B, 3\] \(B samples\), got \[2\]$"):
        ef.SampleStats((3,)).update(torch.zeros(2))
