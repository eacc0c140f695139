"""Feature extraction to shards, codebook files, `build_codebook` end to end and `vqtok codebook build`."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

import vqtok
from vqtok.backbones import FeatureEncoder
from vqtok.codebook import FeatureShards, assign, extract_features, pool_to_grid, read_codebook_file, save_codebook
from vqtok.codebook.build import build_codebook, default_workers, request_key
from vqtok.codebook.command import add_subcommand
from vqtok.codebook.features import resolve_precision
from vqtok.core.codebook_file import read_metadata


class PixelEncoder(FeatureEncoder):
    """Feature map = the image itself, 2x2-average-pooled (F = 3): makes pooled features checkable by hand."""

    def __init__(self) -> None:
        super().__init__("pixels", "identity", 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), None, 8)
        self.calls = 0

    def encode(self, x: Tensor) -> Tensor:
        self.calls += 1
        return F.avg_pool2d(x, 2)


class TensorImages(Dataset):
    """n random images (3, 8, 8) with labels i % 3."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.images = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], i % 3


def test_pool_to_grid_averages_cells_image_major_row_major() -> None:
    fmap = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    rows = pool_to_grid(fmap, 2)  # (2 * 4, 1)
    assert rows.flatten().tolist() == [2.5, 4.5, 10.5, 12.5, 18.5, 20.5, 26.5, 28.5]
    with pytest.raises(ValueError, match="smaller than the 8x8 grid"):
        pool_to_grid(fmap, 8)


def test_extract_features_writes_pooled_rows_and_labels(tmp_path) -> None:
    data = TensorImages(10)
    shards = extract_features(PixelEncoder(), data, grid=2, batch_size=4, out_dir=tmp_path, progress=False,
                              shard_images=4)
    features, labels = shards.load()
    assert features.shape == (10 * 4, 3) and len(shards) == 40
    expected = F.adaptive_avg_pool2d(data.images, 2).permute(0, 2, 3, 1).reshape(40, 3)  # cells of 4x4 pixels
    np.testing.assert_allclose(features, expected.numpy(), atol=1e-6)
    assert labels.tolist() == [i % 3 for i in range(10) for _ in range(4)]


class ScaledPixelEncoder(PixelEncoder):
    """PixelEncoder times a trainable scale: with autograd on, its output would need a gradient. Records, per
    batch, whether the output requires grad and whether autograd was recording."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.seen: list[tuple[bool, bool]] = []

    def encode(self, x: Tensor) -> Tensor:
        out = super().encode(x) * self.scale
        self.seen.append((out.requires_grad, torch.is_grad_enabled()))
        return out


class GradImages(TensorImages):
    """TensorImages whose images require grad, as if they came out of a differentiable pipeline."""

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i].clone().requires_grad_(True), i % 3


def test_extraction_runs_the_encoder_without_autograd(tmp_path) -> None:
    data, encoder = GradImages(6), ScaledPixelEncoder()
    assert encoder(data[0][0][None]).requires_grad  # outside extraction, forward keeps autograd
    encoder.seen.clear()
    shards = extract_features(encoder, data, grid=2, batch_size=4, out_dir=tmp_path, progress=False)
    assert encoder.seen == [(False, False), (False, False)]  # two batches, no graph recorded for either
    expected = F.adaptive_avg_pool2d(data.images, 2).permute(0, 2, 3, 1).reshape(24, 3)
    np.testing.assert_allclose(shards.load()[0], expected.numpy(), atol=1e-6)


def test_ranks_split_the_shards_and_together_equal_one_process(tmp_path) -> None:
    data = TensorImages(11)
    whole = extract_features(PixelEncoder(), data, grid=2, out_dir=tmp_path / "one", progress=False, shard_images=3)
    for rank in (0, 1):
        part = extract_features(PixelEncoder(), data, grid=2, out_dir=tmp_path / "two", rank=rank, world_size=2,
                                progress=False, shard_images=3)
        assert part.missing() == ([1, 3] if rank == 0 else [])  # rank 0 wrote shards 0 and 2 only
    np.testing.assert_array_equal(part.load()[0], whole.load()[0])


def test_extraction_resumes_at_the_missing_shard(tmp_path) -> None:
    data = TensorImages(12)
    first = extract_features(PixelEncoder(), data, grid=2, batch_size=2, out_dir=tmp_path, progress=False,
                             shard_images=4)
    reference = first.load()[0]
    first.shard_path(1).unlink()  # as if killed while writing shard 1
    encoder = PixelEncoder()
    resumed = extract_features(encoder, data, grid=2, batch_size=2, out_dir=tmp_path, progress=False, shard_images=4)
    assert encoder.calls == 2  # the 4 images of shard 1, in batches of 2
    np.testing.assert_array_equal(resumed.load()[0], reference)
    with pytest.raises(ValueError, match="different extraction"):
        extract_features(PixelEncoder(), data, grid=1, out_dir=tmp_path, progress=False, shard_images=4)


def test_save_and_load_keep_the_codebook_and_string_metadata(tmp_path) -> None:
    codebook = torch.randn(7, 5)
    path = save_codebook(tmp_path / "cb.safetensors", codebook, {"encoder": "mobilenetv2", "seed": 3, "grid": 4})
    loaded, meta = read_codebook_file(path)
    torch.testing.assert_close(loaded, codebook)
    assert meta["encoder"] == "mobilenetv2" and meta["seed"] == "3" and meta["codebook_size"] == "7"
    assert meta["feature_dim"] == "5" and meta["vqtok_version"]
    assert [p.name for p in tmp_path.iterdir()] == ["cb.safetensors"]  # the temporary file was renamed
    with pytest.raises(ValueError, match="NaN"):
        save_codebook(tmp_path / "bad.safetensors", torch.full((2, 2), float("nan")), {})


@pytest.fixture(scope="module")
def photo_codebook(tmp_path_factory) -> tuple:
    """A 48-code codebook from 64 photo crops of 64 px, efficientnet-lite0 features pooled 2x2 (256 features)."""
    root = tmp_path_factory.mktemp("codebook")
    options = dict(encoder="efficientnet-lite0", source="photos", size=48, crops=64, crop_size=64, grid=2,
                   cache_dir=root / "cache", progress=False)
    path = build_codebook(out=root / "a.safetensors", **options)
    return path, options, root


def test_build_codebook_writes_k_centres_and_its_recipe(photo_codebook) -> None:
    path, _, _ = photo_codebook
    codebook, meta = read_codebook_file(path)
    assert codebook.shape == (48, 320) and codebook.dtype == torch.float32
    assert {k: meta[k] for k in ("encoder", "layer", "pooling", "source", "codebook_size", "method", "seed",
                                 "feature_dim", "num_features")} == {
        "encoder": "efficientnet-lite0", "layer": "block15", "pooling": "avg 2x2", "source": "photos",
        "codebook_size": "48", "method": "two-level", "seed": "0", "feature_dim": "320", "num_features": "256"}


def test_same_request_same_codebook_and_the_file_is_reused(photo_codebook, monkeypatch) -> None:
    path, options, root = photo_codebook
    again = build_codebook(out=root / "b.safetensors", **options)  # features from the cache, clustering redone
    torch.testing.assert_close(read_codebook_file(again)[0], read_codebook_file(path)[0], rtol=0, atol=0)
    import vqtok.codebook.build as build_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("an identical request rebuilt the codebook")

    monkeypatch.setattr(build_module, "build_encoder", must_not_run)
    assert build_codebook(out=path, **options) == path
    with pytest.raises(AssertionError, match="rebuilt"):
        build_codebook(out=path, **(options | {"seed": 1}))


def test_lc_quantizer_reads_the_built_file(photo_codebook) -> None:
    path, _, _ = photo_codebook
    raw = vqtok.build_quantizer("lc", codebook_size=48, dim=8, codebook=path, standardize=False)
    torch.testing.assert_close(raw.codebook, read_codebook_file(path)[0], rtol=0, atol=0)
    q = vqtok.build_quantizer("lc", codebook_size=48, dim=8, codebook=path)  # the default: standardised features
    assert q.codebook.shape == (48, 320)
    out = q(torch.randn(2, 8, 3, 3))
    assert out.indices.shape == (2, 3, 3) and int(out.indices.max()) < 48


def test_per_class_on_a_labelled_folder_gives_each_class_k_over_classes_codes(tmp_path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, colour in (("red", [200, 30, 30]), ("sky", [40, 90, 220])):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(5):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    path = build_codebook(encoder="mobilenetv2", source=str(tmp_path / "data"), size=6, method="per-class",
                          crop_size=64, grid=2, out=tmp_path / "cb.safetensors", cache_dir=tmp_path / "cache",
                          progress=False)
    features, labels = FeatureShards(next((tmp_path / "cache").glob("features-*"))).load()  # (10 * 4, 320)
    assert features.shape == (40, 320) and sorted(set(labels.tolist())) == [0, 1]
    class_means = np.stack([features[labels == c].mean(0) for c in (0, 1)])
    _, nearest_class = assign(read_codebook_file(path)[0].numpy(), class_means)
    assert np.bincount(nearest_class, minlength=2).tolist() == [3, 3]


# 40 crops of 64 px in shards of 2,048: one shard, 5 batches of 8; one thread, so both builds do the same arithmetic
SMALL = dict(encoder="mobilenetv2", source="photos", size=24, method="kmeans", crops=40, crop_size=64, grid=2,
             batch_size=8, threads=1, progress=False)


def _features(cache_dir) -> np.ndarray:
    return FeatureShards(next(cache_dir.glob("features-*"))).load()[0]


def test_dataloader_workers_give_bitwise_the_main_process_features_and_reuse_its_codebook(tmp_path,
                                                                                          monkeypatch) -> None:
    main = build_codebook(out=tmp_path / "w0.safetensors", cache_dir=tmp_path / "c0", num_workers=0, **SMALL)
    two = build_codebook(out=tmp_path / "w2.safetensors", cache_dir=tmp_path / "c2", num_workers=2, **SMALL)
    np.testing.assert_array_equal(_features(tmp_path / "c2"), _features(tmp_path / "c0"))  # (160, 1280)
    torch.testing.assert_close(read_codebook_file(two)[0], read_codebook_file(main)[0], rtol=0, atol=0)
    assert read_metadata(two)["cache_key"] == read_metadata(main)["cache_key"]
    import vqtok.codebook.build as build_module

    monkeypatch.setattr(build_module, "build_encoder", lambda *a, **k: pytest.fail("workers changed the cache key"))
    assert build_codebook(out=main, cache_dir=tmp_path / "c0", num_workers=3, **SMALL) == main


def test_bf16_encoder_has_its_own_cache_key_and_fp32_keeps_the_key_it_had(tmp_path) -> None:
    fp32 = build_codebook(out=tmp_path / "fp32.safetensors", cache_dir=tmp_path / "c", precision="auto", **SMALL)
    before = dict(encoder="mobilenetv2", layer=None, weights=None, source="photos", size=24, method="kmeans", seed=0,
                  grid=2, crops=40, crop_size=64, niter=20)  # the request as hashed before precision existed
    meta = read_metadata(fp32)
    assert meta["cache_key"] == request_key(before) and meta["precision"] == "fp32"  # auto on a CPU: fp32
    bf16 = build_codebook(out=tmp_path / "bf16.safetensors", cache_dir=tmp_path / "c", precision="bf16", **SMALL)
    assert read_metadata(bf16)["precision"] == "bf16"
    assert read_metadata(bf16)["cache_key"] == request_key(before | {"precision": "bf16"})
    folders = {json.loads((d / "manifest.json").read_text()).get("precision", "fp32"): FeatureShards(d).load()[0]
               for d in (tmp_path / "c").glob("features-*")}
    assert sorted(folders) == ["bf16", "fp32"]  # a feature cache of its own
    relative = np.linalg.norm(folders["bf16"] - folders["fp32"]) / np.linalg.norm(folders["fp32"])
    assert 1e-4 < relative < 0.3  # bf16 autocast really ran (mobilenetv2 here: 13% off fp32, as bf16 goes)


def test_precision_auto_is_bf16_on_cuda_only_and_default_workers_follow_the_cpus(monkeypatch) -> None:
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="choose one of"):
        resolve_precision("fp16", torch.device("cpu"))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    workers = {}
    for cpus in (1, 2, 6, 32):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        workers[cpus] = default_workers()
    assert workers == {1: 0, 2: 1, 6: 5, 32: 8}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's 4 processes on this node share the 32 CPUs
    assert default_workers() == 7


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_extraction_with_workers_and_pinned_memory_equals_the_main_process(tmp_path) -> None:
    options = SMALL | dict(device="cuda", precision="fp32")
    build_codebook(out=tmp_path / "w0.safetensors", cache_dir=tmp_path / "c0", num_workers=0, **options)
    build_codebook(out=tmp_path / "w2.safetensors", cache_dir=tmp_path / "c2", num_workers=2, **options)
    np.testing.assert_array_equal(_features(tmp_path / "c2"), _features(tmp_path / "c0"))
    auto = build_codebook(out=tmp_path / "auto.safetensors", cache_dir=tmp_path / "c3", **(SMALL | {"device": "cuda"}))
    assert read_metadata(auto)["precision"] == "bf16"


def test_too_few_features_for_k_is_refused_before_extraction(tmp_path) -> None:
    with pytest.raises(ValueError, match="at least 100 crops"):
        build_codebook(source="photos", size=1600, crops=10, grid=4, out=tmp_path / "x.safetensors",
                       cache_dir=tmp_path, progress=False)


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vqtok")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_command_builds_the_codebook(tmp_path, capsys) -> None:
    out = tmp_path / "cb.safetensors"
    args = _cli(["codebook", "build", "--encoder", "mobilenetv2", "--data", "photos", "--size", "20", "--method",
                 "kmeans", "--crops", "16", "--crop-size", "64", "--grid", "2", "--out", str(out), "--seed", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--workers", "0", "--precision", "bf16"])
    assert args.func(args) == 0
    codebook, meta = read_codebook_file(out)
    assert codebook.shape == (20, 320) and meta["method"] == "kmeans" and meta["seed"] == "1"
    assert meta["precision"] == "bf16"
    assert "20 x 320 codebook" in capsys.readouterr().out
    bad = _cli(["codebook", "build", "--method", "agglomerative", "--out", str(out), "--no-progress"])
    assert bad.func(bad) == 2 and "choose one of" in capsys.readouterr().err


def test_command_help_has_an_example(capsys) -> None:
    with pytest.raises(SystemExit):
        _cli(["codebook", "build", "--help"])
    assert "vqtok codebook build --encoder efficientnet-lite0 --data photos" in capsys.readouterr().out
