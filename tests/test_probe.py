"""The linear probe: fit_linear_probe on synthetic features, and `vqtok probe` on a tiny run directory."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_colour_folder

from vqtok.cli import main
from vqtok.data.fashion_mnist import default_dir, has_idx_files
from vqtok.metrics import fit_linear_probe, run_probe, run_probes
from vqtok.models import Tokenizer, TokenizerConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Small matrix products: one thread is faster than two on a shared CPU (and no slower alone)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clusters(n: int, classes: int, dims: int, seed: int, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around fixed class centres (the same centres for every seed): linearly separable."""
    centres = torch.randn(classes, dims, generator=torch.Generator().manual_seed(123)) * 3.0
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    return centres[labels] + spread * torch.randn(n, dims, generator=g), labels


def test_probe_separates_linearly_separable_features():
    train_x, train_y = clusters(300, 4, 20, seed=0)
    val_x, val_y = clusters(200, 4, 20, seed=1)
    train_x[:, 3] *= 1000.0  # a badly scaled feature: standardisation makes it harmless
    val_x[:, 3] *= 1000.0
    before = train_x.clone()
    result = fit_linear_probe(train_x, train_y, val_x, val_y)
    assert result["top1"] >= 0.95 and result["train_top1"] >= 0.95
    assert (result["classes"], result["dims"], result["train_images"], result["val_images"]) == (4, 20, 300, 200)
    assert result["chance"] == pytest.approx(0.25) and result["iterations"] > 0
    assert torch.equal(train_x, before)  # the caller's features are not modified
    assert fit_linear_probe(train_x, train_y, val_x, val_y)["top1"] == result["top1"]  # deterministic


def test_probe_of_random_labels_is_at_chance():
    g = torch.Generator().manual_seed(0)
    train_x, val_x = torch.randn(400, 30, generator=g), torch.randn(400, 30, generator=g)
    train_y, val_y = torch.randint(4, (400,), generator=g), torch.randint(4, (400,), generator=g)
    result = fit_linear_probe(train_x, train_y, val_x, val_y)
    assert 0.15 < result["top1"] < 0.35  # chance is 0.25
    assert result["train_top1"] > result["top1"] + 0.05  # it fits noise on train, which does not transfer


def test_probe_is_invariant_to_the_scale_and_offset_of_each_feature():
    """Both splits are standardised with the train statistics, so an affine change of a feature changes nothing."""
    g = torch.Generator().manual_seed(0)
    train_x, val_x = torch.randn(400, 30, generator=g), torch.randn(400, 30, generator=g)
    train_y, val_y = torch.randint(4, (400,), generator=g), torch.randint(4, (400,), generator=g)
    scale, offset = torch.rand(30, generator=g) * 20 + 0.1, torch.randn(30, generator=g) * 100
    plain = fit_linear_probe(train_x, train_y, val_x, val_y)
    moved = fit_linear_probe(train_x * scale + offset, train_y, val_x * scale + offset, val_y)
    assert moved["top1"] == pytest.approx(plain["top1"], abs=0.006)
    assert moved["train_top1"] == pytest.approx(plain["train_top1"], abs=0.006)
    assert moved["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-3)


def test_probe_standardises_with_the_train_statistics():
    """A val split shifted as a whole must be scored with the train split's mean: the shift costs accuracy."""
    train_x, train_y = clusters(300, 2, 5, seed=0, spread=0.5)
    val_x, val_y = clusters(200, 2, 5, seed=1, spread=0.5)
    shift = (torch.randn(2, 5, generator=torch.Generator().manual_seed(123)) * 3.0)
    assert fit_linear_probe(train_x, train_y, val_x, val_y)["top1"] == 1.0
    moved = val_x + (shift[1] - shift[0]) * 3  # every val point moved far beyond class 1's side
    assert fit_linear_probe(train_x, train_y, moved, val_y)["top1"] == pytest.approx(0.5)


def test_probe_rejects_classes_missing_from_train_and_mismatched_shapes():
    x, y = clusters(40, 2, 3, seed=0)
    with pytest.raises(ValueError, match="never occur"):
        fit_linear_probe(x, y, x, y + 2)
    with pytest.raises(ValueError, match="expected train"):
        fit_linear_probe(x, y[:10], x, y)


# -- the command -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("probe") / "run"
    config = TokenizerConfig(preset="tiny", image_size=32, quantizer="vq", codebook_size=64, dim=8)
    Tokenizer(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """train/ and val/ with two classes: reddish and bluish 32 px noise images."""
    return write_colour_folder(tmp_path_factory.mktemp("colours"), train=12, val=8)


def test_probe_command_writes_one_entry_per_feature_kind(run_dir, colour_folder, capsys):
    for features in ("pooled", "pixels"):
        assert main(["probe", str(run_dir), "--data", str(colour_folder), "--features", features,
                     "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("probe pixels (3,072-d): top-1 1.0000 on 16 val images") and "wrote" in out[-1]
    saved = json.loads((run_dir / "probe.json").read_text())
    assert set(saved) == {"pooled", "pixels"}
    assert saved["pooled"]["dims"] == 8 and saved["pooled"]["train_images"] == 24 and saved["pixels"]["top1"] == 1.0
    assert "pooled" in saved["pooled"]["protocol"]["features"]
    assert saved["pooled"]["protocol"]["model"]["weights"] == "model.safetensors"
    assert saved["pixels"]["protocol"]["data"]["val"]["count"] == 16



def test_probing_several_kinds_at_once_encodes_once_and_equals_one_kind_at_a_time(run_dir, colour_folder, tmp_path,
                                                                                 monkeypatch):
    from vqtok.models import Tokenizer

    separate = {kind: run_probe(run_dir, str(colour_folder), kind, out=tmp_path / f"{kind}.json")
                for kind in ("pooled", "flat", "pixels")}
    calls = []
    encode = Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode", lambda self, x: calls.append(len(x)) or encode(self, x))
    together = run_probes(run_dir, str(colour_folder), ("pooled", "flat", "pixels"), out=tmp_path / "all.json")
    assert sum(calls) == 24 + 16, f"{sum(calls)} images encoded for 24 train + 16 val images"
    saved = json.loads((tmp_path / "all.json").read_text())
    assert set(together) == set(saved) == {"pooled", "flat", "pixels"}
    for kind, entry in separate.items():
        assert together[kind]["dims"] == entry["dims"] and together[kind]["features"] == kind
        assert together[kind]["top1"] == entry["top1"] and together[kind]["train_top1"] == entry["train_top1"]
        assert together[kind]["train_loss"] == pytest.approx(entry["train_loss"], rel=1e-6)

@pytest.mark.skipif(not has_idx_files(default_dir()), reason="Fashion-MNIST is not installed")
def test_probe_command_on_fashion_mnist(run_dir, tmp_path, capsys):
    out = tmp_path / "probe.json"
    for features in ("flat", "pixels"):
        assert main(["probe", str(run_dir), "--data", "fashion-mnist", "--features", features, "--train-limit", "200",
                     "--val-limit", "100", "--max-iter", "100", "--out", str(out), "--no-progress"]) == 0
    saved = json.loads(out.read_text())
    assert saved["flat"]["dims"] == 8 * 8 * 8 and saved["flat"]["classes"] == 10
    assert saved["pixels"]["top1"] > 0.6 and saved["flat"]["top1"] > 0.3  # chance: ~0.1


@pytest.mark.parametrize("args, message", [
    (["--data", "photos"], "no classes shared"),
    (["--train-limit", "0"], "train_limit must be a positive"),
    (["--features", "pixels", "--data", "no/such/folder"], "unknown data source"),
])
def test_probe_command_user_mistakes_end_with_one_line(run_dir, colour_folder, capsys, args, message):
    argv = ["probe", str(run_dir), "--no-progress", *args]
    if "--data" not in args:
        argv += ["--data", str(colour_folder)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("vqtok probe: error:") and err.count("\n") == 1


def test_probe_command_reports_a_missing_run_and_corrupt_weights(tmp_path, colour_folder, capsys):
    assert main(["probe", str(tmp_path / "nothing"), "--data", str(colour_folder)]) == 2
    assert "config.json not found" in capsys.readouterr().err
    run = tmp_path / "broken"
    config = TokenizerConfig(preset="tiny", image_size=32, quantizer="vq", codebook_size=16, dim=4)
    Tokenizer(config).save_pretrained(run)
    (run / "model.safetensors").write_bytes(b"not safetensors")
    assert main(["probe", str(run), "--data", str(colour_folder), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot be loaded" in err and err.count("\n") == 1
