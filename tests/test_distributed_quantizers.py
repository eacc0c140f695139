"""Two gloo processes: CodeUsage.all_reduce gives the single-process counts, and ema stays identical on both ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqtok import CodeUsage, build_quantizer

pytestmark = pytest.mark.distributed

WORLD, K, D = 2, 32, 4


def batch_for(rank: int, step: int) -> torch.Tensor:
    return torch.randn(2, D, 3, 3, generator=torch.Generator().manual_seed(100 * step + rank))


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # same initial codebook on both ranks, as DDP's broadcast would give
        q = build_quantizer("ema", codebook_size=K, dim=D, decay=0.5).train()
        usage = CodeUsage(K)
        for step in range(3):
            usage.update(q(batch_for(rank, step)).indices)
        total = usage.all_reduce()
        torch.save({"local": usage.counts, "total": total.counts, "ema": q.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_and_ema_under_two_gloo_processes(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    assert torch.equal(results[0]["total"], results[1]["total"])
    assert torch.equal(results[0]["total"], results[0]["local"] + results[1]["local"])
    for key, value in results[0]["ema"].items():
        assert torch.equal(value, results[1]["ema"][key]), key

    # A single process that sees both ranks' batches as one batch per step gives the same EMA state and counts.
    torch.manual_seed(0)
    q = build_quantizer("ema", codebook_size=K, dim=D, decay=0.5).train()
    usage = CodeUsage(K)
    for step in range(3):
        usage.update(q(torch.cat([batch_for(r, step) for r in range(WORLD)])).indices)
    assert torch.equal(usage.counts, results[0]["total"])
    for key, value in q.state_dict().items():
        assert torch.allclose(value, results[0]["ema"][key], atol=1e-6), key
