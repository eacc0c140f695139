"""The generator run: token shards, `vqtok gen train` in the shared loop (exact resume, learning), `gen sample`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vqtok.cli import main
from vqtok.data.tokens import TokenShards
from vqtok.generate.config import GenTrainConfig, load_generator
from vqtok.generate.trainer import GeneratorTrainer
from vqtok.models import Tokenizer, TokenizerConfig
from vqtok.train.config import load_config

K, CLASSES, GRID = 16, 3, (2, 2)


def class_pattern(label: int) -> np.ndarray:
    """A fixed 2 x 2 token map per class: what a generator of this data must learn."""
    return (np.arange(4).reshape(GRID) * 3 + label * 5) % K


def write_tokens(folder: Path, count: int = 48, views: int = 1, run: str | None = None) -> Path:
    """Token shards in `vqtok encode`'s layout: each image's map is its class pattern (views: the same map)."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.arange(count) % CLASSES
    tokens = np.stack([class_pattern(int(c)) for c in labels]).astype(np.int16)  # (n, h, w)
    if views > 1:
        tokens = np.repeat(tokens[:, None], views, axis=1)  # (n, A, h, w)
    half = count // 2
    shards = []
    for i, (lo, hi) in enumerate(((0, half), (half, count))):
        np.save(folder / f"tokens-{i:05d}.npy", tokens[lo:hi])
        np.save(folder / f"labels-{i:05d}.npy", labels[lo:hi].astype(np.int64))
        shards.append({"tokens": f"tokens-{i:05d}.npy", "labels": f"labels-{i:05d}.npy", "count": hi - lo})
    index = {"run": run, "codebook_size": K, "grid": list(GRID), "image_size": 8, "dtype": "int16",
             "count": count, "data": {"source": "photos"}, "shards": shards}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def gen_config(tokens: Path, *extra: str) -> GenTrainConfig:
    base = [f"data.tokens={tokens}", "data.batch_size=8", "data.num_workers=0", "steps=6", "log_every=1",
            "checkpoint_every=3", "evaluate=false", "device=cpu", "optim.lr=3e-3", "optim.warmup_steps=0",
            "model={preset: tiny, dim: 32, depth: 2, heads: 2, mlp_hidden: 64}"]
    return load_config(None, base + list(extra), config_class=GenTrainConfig)


def test_token_shards_read_memory_mapped_and_pick_one_view_per_epoch(tmp_path):
    folder = write_tokens(tmp_path / "tok", count=10, views=2)
    data = TokenShards(folder, seed=0)
    assert len(data) == 10 and data.views == 2 and data.grid == GRID and data.num_classes == CLASSES
    assert isinstance(data.tokens[0], np.memmap)
    ids, label = data[7]
    assert ids.dtype == torch.int64 and ids.shape == (4,) and int(label) == 7 % CLASSES
    assert torch.equal(ids, torch.from_numpy(class_pattern(7 % CLASSES).reshape(-1).astype(np.int64)))
    # views: the choice depends on (seed, epoch, index) only
    marked = np.load(folder / "tokens-00000.npy")
    marked[:, 1] = (marked[:, 1] + 1) % K  # view 1 differs from view 0
    np.save(folder / "tokens-00000.npy", marked)
    data = TokenShards(folder, seed=0)
    chosen = []
    for epoch in range(8):
        data.set_epoch(epoch)
        chosen.append(int(not torch.equal(data[0][0], torch.from_numpy(marked[0, 0].reshape(-1).astype(np.int64)))))
    assert 0 < sum(chosen) < 8  # both views are used across epochs
    data.set_epoch(3)
    again = TokenShards(folder, seed=0)
    again.set_epoch(3)
    assert torch.equal(data[0][0], again[0][0])


def test_a_missing_token_folder_is_a_one_line_error(tmp_path, capsys):
    code = main(["gen", "train", "--tokens", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "index.json" in err[0]


def test_vqtok_debug_shows_the_traceback_of_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VQTOK_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="index.json"):
        main(["gen", "train", "--tokens", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--no-progress"])


def test_gen_train_learns_the_class_patterns(tmp_path):
    """60 steps on 3 fixed class patterns: the chunked-head loss falls below a tenth of its start and greedy
    sampling reproduces every class's pattern."""
    tokens = write_tokens(tmp_path / "tok")
    config = gen_config(tokens, "steps=60", "checkpoint_every=60", "log_every=10",
                        "model={preset: tiny, dim: 32, depth: 2, heads: 2, mlp_hidden: 64, class_dropout: 0.0,"
                        " token_dropout: 0.0}")
    trainer = GeneratorTrainer(config, tmp_path / "run", progress=False)
    trainer.train()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "train"]
    assert losses[-1] < 0.1 * losses[0]
    from vqtok.generate import sample

    model, _ = load_generator(tmp_path / "run")
    ids = sample(model, torch.arange(CLASSES), top_k=1)
    for c in range(CLASSES):
        assert np.array_equal(ids[c].numpy(), class_pattern(c))


def test_gen_train_n_then_resume_n_equals_2n(tmp_path):
    """Steps 1-3, a new process resuming from the checkpoint, steps 4-6: the weights and every logged loss equal an
    uninterrupted 6-step run (label dropout, token dropout and 2 epochs of shuffling in between)."""
    tokens = write_tokens(tmp_path / "tok", count=24)
    extra = ("optim.schedule=cosine", "optim.warmup_steps=2")
    GeneratorTrainer(gen_config(tokens, *extra), tmp_path / "full", progress=False).train()
    GeneratorTrainer(gen_config(tokens, *extra), tmp_path / "split", progress=False).train(until=3)
    GeneratorTrainer(gen_config(tokens, *extra), tmp_path / "split", resume=True, progress=False).train()
    full, split = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(
        str(tmp_path / "split" / "model.safetensors"))
    assert full.keys() == split.keys() and all(torch.equal(full[k], split[k]) for k in full)

    def losses(run: str) -> dict[int, float]:
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if r["event"] == "train"}

    assert losses("full") == losses("split") and len(losses("full")) == 6


def test_gen_sample_writes_an_adm_npz_and_a_grid(tmp_path):
    torch.manual_seed(0)
    tokenizer = Tokenizer(TokenizerConfig(preset="tiny", image_size=8, quantizer="vq", codebook_size=K, dim=4))
    tokenizer.save_pretrained(tmp_path / "tok-run")
    tokens = write_tokens(tmp_path / "tok", run=str(tmp_path / "tok-run"))
    GeneratorTrainer(gen_config(tokens, "steps=2"), tmp_path / "run", progress=False).train()
    out = tmp_path / "s.npz"
    assert main(["gen", "sample", str(tmp_path / "run"), "--per-class", "2", "--cfg", "1.5", "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    arrays = np.load(out)
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (6, 8, 8, 3)
    assert arrays["arr_1"].tolist() == [0, 0, 1, 1, 2, 2]
    assert (tmp_path / "s.png").is_file()
    # the same seed gives the same samples
    again = tmp_path / "t.npz"
    main(["gen", "sample", str(tmp_path / "run"), "--per-class", "2", "--cfg", "1.5", "--out", str(again),
          "--device", "cpu", "--no-progress"])
    assert np.array_equal(np.load(again)["arr_0"], arrays["arr_0"])


def test_encode_augment_views_are_the_image_its_mirror_and_ten_crops():
    from vqtok.train.command import augmented_views

    images = torch.rand(2, 3, 11, 11)
    flip = augmented_views(images, "flip", 11)
    assert flip.shape == (2, 2, 3, 11, 11)
    assert torch.equal(flip[:, 0], images) and torch.equal(flip[:, 1], images.flip(-1))
    ten = augmented_views(images, "ten-crop", 8)  # LlamaGen: crops of 8 from a 1.1x larger square
    assert ten.shape == (2, 10, 3, 8, 8)
    assert torch.equal(ten[:, 0], images[..., 1:9, 1:9])  # view 0: the centre crop
    assert torch.equal(ten[:, 1], images[..., :8, :8]) and torch.equal(ten[:, 4], images[..., 3:, 3:])
    assert torch.equal(ten[:, 5:], ten[:, :5].flip(-1))
    assert torch.equal(augmented_views(images, "none", 11)[:, 0], images)


def write_idx(folder: Path, split: str, count: int) -> None:
    """A Fashion-MNIST-layout folder: class c is a bright bar at rows 4 + 8c (3 classes), with pixel noise."""
    names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}[split]
    rng = np.random.default_rng(len(split))
    labels = (np.arange(count) % CLASSES).astype(np.uint8)
    images = rng.integers(0, 40, (count, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, 4 + 8 * c : 8 + 8 * c, 3:25] = 230
    folder.mkdir(parents=True, exist_ok=True)
    header = lambda dims: bytes([0, 0, 8, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    (folder / names[0]).write_bytes(header(images.shape) + images.tobytes())
    (folder / names[1]).write_bytes(header(labels.shape) + labels.tobytes())


@pytest.mark.slow
def test_gen_train_ends_with_samples_scored_beside_the_reference_points(tmp_path):
    """encode -> gen train -> the final evaluation: samples.npz/png, metrics.json with gfid, precision, recall,
    class accuracy for the samples, no_cfg and the three reference points at the same N, and report.md."""
    data = tmp_path / "idx"
    write_idx(data, "train", 240)
    write_idx(data, "val", 60)
    torch.manual_seed(0)
    Tokenizer(TokenizerConfig(preset="tiny", image_size=32, quantizer="vq", codebook_size=K, dim=4)).save_pretrained(
        tmp_path / "tok-run")
    assert main(["encode", str(tmp_path / "tok-run"), "--data", str(data), "--split", "train", "--augment", "flip",
                 "--out", str(tmp_path / "tok")]) == 0
    config = gen_config(tmp_path / "tok", "steps=4", "evaluate=true", "sample.per_class=4", "sample.batch_size=6",
                        f"eval.classifier_cache={tmp_path / 'cls'}", "eval.batch_size=6")
    metrics = GeneratorTrainer(config, tmp_path / "run", progress=False).train()["metrics"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["samples"] == metrics["samples"] == 12 and saved["cfg"] == 2.0
    for block in (saved, *(saved[k] for k in ("no_cfg", "floor_real", "floor_recon", "ceiling_unigram"))):
        assert np.isfinite(block["gfid"]) and 0 <= block["precision"] <= 1 and 0 <= block["recall"] <= 1
        assert 0 <= block["class_accuracy"] <= 1 and block["samples"] == 12
    # real training images sit closer to the real held-out set than anything an untrained tokenizer decodes
    assert saved["floor_real"]["gfid"] < min(saved["gfid"], saved["floor_recon"]["gfid"])
    assert saved["floor_real"]["class_accuracy"] >= 0.9  # the bars are easy: the classifier must see them
    assert saved["protocol"]["reference_images"] == 12 and saved["inception_score"] is None
    arrays = np.load(tmp_path / "run" / "samples.npz")
    assert arrays["arr_0"].shape == (12, 32, 32, 3) and sorted(arrays["arr_1"].tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| gfid |" in report and "ceiling_unigram" in report


def test_a_model_config_that_disagrees_with_the_tokens_is_refused(tmp_path):
    tokens = write_tokens(tmp_path / "tok")
    for field in ("vocab_size: 99", "grid: [4, 4]"):
        config = gen_config(tokens, f"model={{preset: tiny, dim: 32, depth: 2, heads: 2, {field}}}")
        with pytest.raises(ValueError, match="disagrees with the tokens"):
            GeneratorTrainer(config, tmp_path / "run", progress=False)
    config = gen_config(tokens, "model={preset: tiny, dim: 32, depth: 2, heads: 2, grid: [2, 2]}")
    GeneratorTrainer(config, tmp_path / "ok", progress=False)  # the same values, as a list, are fine


def test_eval_batch_defaults_by_device_and_a_bad_one_is_refused():
    config = GenTrainConfig.from_dict({"data": {"tokens": "t"}})
    assert config.eval.batch_for("cpu") == 16 and config.eval.batch_for("cuda") == 100
    assert GenTrainConfig.from_dict({"data": {"tokens": "t"}, "eval": {"batch_size": 7}}).eval.batch_for("cpu") == 7
    with pytest.raises(ValueError, match="eval.batch_size"):
        GenTrainConfig.from_dict({"data": {"tokens": "t"}, "eval": {"batch_size": 0}})


def test_the_default_guidance_follows_label_dropout_and_an_unusable_scale_is_refused_before_training(tmp_path):
    tokens = write_tokens(tmp_path / "tok")
    model = "model={preset: tiny, dim: 32, depth: 2, heads: 2, class_dropout: 0.0}"  # as VQGAN-LC's GPT
    trainer = GeneratorTrainer(gen_config(tokens, model, "evaluate=true"), tmp_path / "lc", progress=False)
    assert trainer.config.sample.cfg_scale is None  # default: resolved per model
    assert trainer.config.sample.for_model(trainer.gpt_config).cfg_scale == 1.0
    with pytest.raises(ValueError, match="sample.cfg_scale=2.0.*label dropout"):
        GeneratorTrainer(gen_config(tokens, model, "evaluate=true", "sample.cfg_scale=2"), tmp_path / "cfg",
                         progress=False)
    assert not (tmp_path / "cfg" / "trainer.pt").exists()
    plain = GeneratorTrainer(gen_config(tokens, "evaluate=true"), tmp_path / "llamagen", progress=False)
    assert plain.config.sample.for_model(plain.gpt_config).cfg_scale == 2.0  # class_dropout 0.1


@pytest.mark.parametrize("ema", [True, False])
def test_samples_are_decoded_by_the_tokenizer_weights_that_encoded_the_tokens(tmp_path, ema):
    from vqtok.core.io import save_state_dict
    from vqtok.generate.evaluate import load_for_sampling

    torch.manual_seed(0)
    tokenizer = Tokenizer(TokenizerConfig(preset="tiny", image_size=8, quantizer="vq", codebook_size=K, dim=4))
    assert tokenizer.grid == GRID
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    averaged = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                for k, v in tokenizer.state_dict().items()}
    save_state_dict(averaged, tmp_path / "tokenizer" / "ema.safetensors")
    tokens = write_tokens(tmp_path / "tok", run=str(tmp_path / "tokenizer"))
    index = json.loads((tokens / "index.json").read_text())
    (tokens / "index.json").write_text(json.dumps({**index, "ema": ema}))  # what `vqtok encode [--ema]` records
    GeneratorTrainer(gen_config(tokens, "steps=1"), tmp_path / "run", progress=False).train()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["tokenizer_ema"] is ema
    _, loaded, _, _ = load_for_sampling(tmp_path / "run")
    expected = averaged if ema else tokenizer.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
