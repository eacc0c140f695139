"""`build_codebook` split over two processes as torchrun would run it (rank/world_size, no process group): each rank
extracts its shards, rank 0 clusters, and the file equals the single-process build."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from vqtok.codebook import FeatureShards, read_codebook_file
from vqtok.codebook.build import build_codebook

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD = 2
# shards hold 2048 images: 2100 crops make two, one per rank. One thread everywhere, so that the features (and so
# the codebook) are bitwise those of the single process.
OPTIONS = dict(encoder="mobilenetv2", source="photos", size=64, crops=2100, crop_size=32, grid=1, threads=1,
               progress=False)


def worker(rank: int, root: str) -> None:
    build_codebook(out=f"{root}/two.safetensors", cache_dir=f"{root}/two-cache", rank=rank, world_size=WORLD,
                   **OPTIONS)


def test_two_ranks_build_the_single_process_codebook(tmp_path) -> None:
    mp.spawn(worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    single = build_codebook(out=tmp_path / "one.safetensors", cache_dir=tmp_path / "one-cache", **OPTIONS)
    two, meta = read_codebook_file(tmp_path / "two.safetensors")
    torch.testing.assert_close(two, read_codebook_file(single)[0], rtol=0, atol=0)
    assert meta["num_features"] == "2100"
    shards = FeatureShards(next((tmp_path / "two-cache").glob("features-*")))
    assert shards.manifest["num_shards"] == 2 and shards.missing() == []  # rank 1 wrote shard 1
