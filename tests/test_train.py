"""The trainer: learning happens, resume is exact, a crash mid-checkpoint loses nothing, torchrun ranks agree,
and the encode/decode commands round-trip."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vqtok.cli import main as cli_main
from vqtok.train import load_config, train
from vqtok.core import rundir as rundir_module
from vqtok.core.rundir import RunDir

TINY = [
    "model.preset=tiny", "model.image_size=32", "model.quantizer=vq", "model.codebook_size=64", "model.dim=8",
    "data.source=photos", "data.size=32", "data.train_length=48", "data.val_length=16", "data.batch_size=8",
    "loss.perceptual_weight=0", "fid=false", "eval_images=16", "log_every=1", "checkpoint_every=3",
    "keep_checkpoints=10", "optim.lr=1e-3",
]


def tiny_config(*extra: str):
    return load_config(None, TINY + list(extra))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def log_rows(run_dir: Path, event: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == event]


def test_training_lowers_the_reconstruction_loss_and_raises_psnr_on_unseen_crops(tmp_path):
    """24 steps over 12 epochs of fresh random crops: on validation crops (other photos), the trained model's L1 and
    PSNR beat the untrained model's (the same weights the run started from: same seed)."""
    from vqtok.data import build_dataset
    from vqtok.metrics import evaluate
    from vqtok.models import Tokenizer

    config = tiny_config("steps=24", "data.train_length=16", "eval_images=16", "optim.lr=2e-3")
    torch.manual_seed(config.seed)
    untrained = Tokenizer(config.model)  # the trainer seeds torch with config.seed before building its model
    summary = train(config, tmp_path / "run", progress=False)
    trained = Tokenizer.from_pretrained(tmp_path / "run")
    val = build_dataset("photos", "val", size=32, length=16)
    x = torch.stack([val[i][0] for i in range(16)])
    with torch.no_grad():
        before, after = ((m.eval()(x).x_hat - x).abs().mean().item() for m in (untrained, trained))
    assert after < 0.85 * before, (before, after)
    psnr_before = evaluate(untrained, val, fid=False, progress=False)["psnr"]
    assert summary["metrics"]["psnr"] > psnr_before + 2.0, (psnr_before, summary["metrics"]["psnr"])


# Each recipe is run whole and split (4 steps, checkpoint, a new process's worth of setup, resume); the weights must
# be bitwise equal (CPU runs are deterministic here). 48 crops / 8 = 6 batches an epoch: both runs cross an epoch.
RESUME_RECIPES = {
    "vq-constant": ["model.quantizer=vq", "ema_decay=0.9"],
    "ema-codebook": ["model.quantizer=ema", "ema_decay=0.9"],
    # what a missing restore shows up in: the warm-up + cosine schedule (sched_g / sched_d), dropout (the torch RNG
    # and the loader's base seed), and a GAN that starts before the split (disc, opt_d, LeCAM's EMA, BatchNorm stats)
    "cosine-dropout-gan": ["model.quantizer=vq", "optim.schedule=cosine", "optim.warmup_steps=3",
                           "optim.min_lr_ratio=0.1", "model.overrides={dropout: 0.3}", "loss.disc_weight=0.5",
                           "loss.disc_start=2", "loss.disc_layers=1", "loss.gen_loss=non-saturating",
                           "loss.adaptive_weight=false", "loss.lecam_weight=0.05", "loss.lecam_decay=0.9", "ema_decay=0.9"],
}


@pytest.mark.parametrize("recipe", sorted(RESUME_RECIPES))
def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, recipe):
    extra = RESUME_RECIPES[recipe] + ["steps=10"]
    train(tiny_config(*extra), tmp_path / "full", progress=False)
    train(tiny_config(*extra), tmp_path / "split", until=4, progress=False)
    assert RunDir(tmp_path / "split").latest_checkpoint().name == "step-00000004"
    train(tiny_config(*extra), tmp_path / "split", resume=True, progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        full, split = (load_file(str(tmp_path / r / name)) for r in ("full", "split"))
        assert full.keys() == split.keys()
        assert [k for k in full if not torch.equal(full[k], split[k])] == [], name
    states = [RunDir(tmp_path / r).load_trainer_state() for r in ("full", "split")]  # weights-only
    if states[0]["disc"] is not None:
        assert [k for k in states[0]["disc"] if not torch.equal(states[0]["disc"][k], states[1]["disc"][k])] == []
        assert states[0]["lecam"] is not None and all(
            torch.equal(states[0]["lecam"][k], states[1]["lecam"][k]) for k in states[0]["lecam"])
    losses = [[r["loss"] for r in log_rows(tmp_path / r, "train")] for r in ("full", "split")]
    assert losses[0] == losses[1]  # every step's loss, before and after the split
    tokens = [log_rows(tmp_path / r, "end")[-1]["tokens_train"] for r in ("full", "split")]
    assert tokens[0] == tokens[1] == 6 * 8 * 64  # last complete epoch: 6 batches x 8 crops x 8x8 tokens


def test_each_epoch_draws_new_random_crops(tmp_path, monkeypatch):
    """The photos source draws its train crops from the epoch: no crop of epoch 1 may repeat one of epoch 0."""
    from vqtok.train.trainer import Trainer

    seen: list[torch.Tensor] = []
    real_step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step",
                        lambda self, x, labels: (seen.append(x.clone()), real_step(self, x, labels))[1])
    train(tiny_config("steps=4", "data.train_length=16"), tmp_path / "run", progress=False)  # 2 batches an epoch
    epoch0, epoch1 = torch.cat(seen[:2]), torch.cat(seen[2:])
    assert len(epoch0) == len(epoch1) == 16
    distance = (epoch1[:, None] - epoch0[None]).abs().flatten(2).amax(dim=2)  # (16, 16) max pixel difference
    assert distance.min() > 0.05, distance.min()


def test_utilization_train_is_the_histogram_of_the_last_complete_epoch(tmp_path):
    """lr = 0 keeps the model fixed, so after two epochs `utilization_train` must be exactly the codes of epoch 1's
    crops: neither epoch 0's crops (the crops change per epoch) nor both epochs summed (the histogram restarts)."""
    from vqtok.train.trainer import Trainer

    trainer = Trainer(tiny_config("optim.lr=0", "steps=12"), tmp_path / "run", progress=False)  # 6 batches an epoch
    trainer.train()

    def codes_of_epoch(epoch: int) -> torch.Tensor:
        trainer.train_set.set_epoch(epoch)
        crops = torch.stack([trainer.train_set[i][0] for i in range(len(trainer.train_set))])
        return torch.bincount(trainer.model.encode(crops).flatten(), minlength=64)

    assert trainer.usage_train.tokens == 48 * 64
    assert torch.equal(trainer.usage_train.counts, codes_of_epoch(1))
    assert not torch.equal(codes_of_epoch(0), codes_of_epoch(1))
    epochs = log_rows(tmp_path / "run", "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1] and all(r["tokens_train"] == 48 * 64 for r in epochs)
    assert epochs[-1]["utilization_train"] == pytest.approx(float((codes_of_epoch(1) > 0).float().mean()))


def test_per_rank_tokens_survive_a_resume_after_an_epoch_end(tmp_path):
    extra = ["steps=9"]  # 6 batches an epoch: the split at 7 falls after epoch 0's end
    train(tiny_config(*extra), tmp_path / "full", progress=False)
    train(tiny_config(*extra), tmp_path / "split", until=7, progress=False)
    train(tiny_config(*extra), tmp_path / "split", resume=True, progress=False)
    ends = [log_rows(tmp_path / r, "end")[-1] for r in ("full", "split")]
    assert ends[0]["tokens_train_per_rank"] == ends[1]["tokens_train_per_rank"] == [48 * 64]


@pytest.mark.parametrize("weights, scale", [({"l1_weight": 1.0}, "l1"), ({"l1_weight": 0.0, "l2_weight": 1.0}, "l2")])
def test_the_pixel_loss_is_taken_on_the_papers_minus_one_to_one_scale(tmp_path, weights, scale):
    from vqtok.train.trainer import Trainer

    settings = [f"loss.{k}={v}" for k, v in weights.items()]
    trainer = Trainer(tiny_config("steps=1", *settings), tmp_path / "run", progress=False)
    x = torch.stack([trainer.train_set[i][0] for i in range(8)])  # [0, 1]
    with torch.no_grad():
        error = (trainer.model.train()(x).x_hat.float() * 2 - 1) - (x * 2 - 1)  # taming's x / 127.5 - 1
    expected = error.abs().mean() if scale == "l1" else error.square().mean()
    assert float(trainer.train_step(x)["rec"]) == pytest.approx(float(expected), rel=1e-5)


def test_the_discriminator_follows_the_generators_schedule_from_its_first_step(tmp_path):
    """"Same lr for D" (METHODS 4): D's warm-up + cosine counts global steps, not steps since disc_start."""
    from vqtok.train.trainer import Trainer

    gan = ["optim.schedule=cosine", "optim.warmup_steps=2", "loss.disc_weight=0.5", "loss.disc_start=4",
           "loss.disc_layers=1", "loss.adaptive_weight=false", "steps=8"]
    trainer = Trainer(tiny_config(*gan), tmp_path / "run", progress=False)
    g_lr, d_lr = {}, {}  # step -> the lr each optimiser stepped with
    g_step, d_step = trainer.train_step, trainer._discriminator_step

    def g_recording(*args):
        g_lr[trainer.position.step] = trainer.opt_g.param_groups[0]["lr"]
        return g_step(*args)

    def d_recording(*args):
        d_lr[trainer.position.step] = trainer.opt_d.param_groups[0]["lr"]
        return d_step(*args)

    trainer.train_step, trainer._discriminator_step = g_recording, d_recording
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scheduler steps before D's first step are not warned about
        trainer.train()
    assert sorted(d_lr) == [4, 5, 6, 7] and len(set(d_lr.values())) == 4
    assert all(d_lr[s] == pytest.approx(g_lr[s], rel=1e-12) for s in d_lr), (g_lr, d_lr)


def test_a_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, monkeypatch):
    extra = ["steps=9"]
    train(tiny_config(*extra), tmp_path / "full", progress=False)

    real_save = rundir_module.save_state_dict
    calls = {"n": 0}

    def dying_save(state, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 6): die half way through writing it
            Path(path).write_bytes(b"half a file")
            raise SystemExit("killed while writing a checkpoint")
        return real_save(state, path)

    monkeypatch.setattr(rundir_module, "save_state_dict", dying_save)
    with pytest.raises(SystemExit):
        train(tiny_config(*extra), tmp_path / "crash", progress=False)
    monkeypatch.setattr(rundir_module, "save_state_dict", real_save)

    assert RunDir(tmp_path / "crash").latest_checkpoint().name == "step-00000003"
    assert (tmp_path / "crash" / "checkpoints" / "step-00000006.tmp").exists()  # the torn write is ignored
    train(tiny_config(*extra), tmp_path / "crash", resume=True, progress=False)
    full, crash = weights(tmp_path / "full"), weights(tmp_path / "crash")
    for key in full:
        assert torch.allclose(full[key], crash[key], atol=1e-6, rtol=0), key


def test_a_new_run_refuses_to_overwrite_an_existing_one(tmp_path):
    train(tiny_config("steps=3"), tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config("steps=3"), tmp_path / "run", progress=False)


def test_resume_refuses_a_trainer_state_that_would_need_unpickling(tmp_path, capsys):
    """A trainer.pt holding arbitrary Python objects (an older vqtok's numpy RNG tuple, or anything else) is never
    unpickled: `vqtok train --resume` says so in one line and exits with 2."""
    run = tmp_path / "run"
    train(tiny_config("steps=3", "checkpoint_every=3"), run, progress=False)
    checkpoint = RunDir(run).latest_checkpoint()
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    state["rng"]["numpy"] = np.random.get_state()  # a tuple holding a numpy array: needs the unpickler
    torch.save(state, checkpoint / "trainer.pt")
    assert cli_main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "weights-only" in err and err.startswith("vqtok train: error:"), err


@pytest.mark.parametrize("args, says", [
    (["--set", "optim.lr=abc"], "optim.lr='abc' is not a number"),
    (["--set", "data.batch_size=8.5"], "data.batch_size=8.5 is not an integer"),
    (["--set", "steps=.inf"], "steps=inf is not an integer"),
    (["--set", "optim.betas=[0.5]"], "optim.betas=[0.5] is not a list of 2 values"),
    (["--set", "model.quantizr=vq"], "unknown config key"),
    (["--set", "model.quantizer=lc", "--set", "model.quantizer_options={codebook: CODEBOOK}"], "not a readable"),
    (["--set", "model.quantizer=lc", "--set", "model.codebook_size=7",
      "--set", "model.quantizer_options={codebook: GOOD}"], "holds 5 codes but codebook_size=7"),
    (["--resume"], "not a vqtok run directory"),
])
def test_a_users_mistake_is_one_line_and_exit_status_2(tmp_path, capsys, args, says):
    from vqtok.core.codebook_file import save_codebook

    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    save_codebook(tmp_path / "good.safetensors", torch.randn(5, 4), {})
    args = [a.replace("CODEBOOK", str(tmp_path / "bad.safetensors")).replace("GOOD", str(tmp_path / "good.safetensors"))
            for a in args]
    overrides = [a for o in TINY for a in ("--set", o)]
    assert cli_main(["train", *overrides, *args, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vqtok train: error:") and says in err, err


def test_a_non_finite_loss_stops_training_before_any_checkpoint_holds_its_step(tmp_path):
    """On an accelerator the finite check is a flag on the device, read at the next log or checkpoint; on the CPU it
    is read at once. Either way save() refuses to write weights a non-finite loss has stepped."""
    from vqtok.train.trainer import Trainer

    trainer = Trainer(tiny_config("steps=3"), tmp_path / "run", progress=False)
    loss = trainer.model.encoder.conv_in.weight.sum() * float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        trainer.optimizer_step(trainer.opt_g, trainer.sched_g, trainer.g_params, loss)
    with pytest.raises(FloatingPointError, match="--resume"):
        trainer.save()
    assert RunDir(tmp_path / "run").latest_checkpoint() is None


def test_a_training_step_returns_tensors_and_the_log_reads_them(tmp_path):
    """train_step leaves its losses on the device (no .item() per step); the log rows hold plain numbers."""
    from vqtok.train.trainer import Trainer

    trainer = Trainer(tiny_config("steps=2", "log_every=2"), tmp_path / "run", progress=False)
    x = torch.stack([trainer.train_set[i][0] for i in range(8)])
    logs = trainer.train_step(x)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for k, v in logs.items() if k != "lr")
    trainer.train()
    rows = log_rows(tmp_path / "run", "train")
    assert [r["step"] for r in rows] == [2] and isinstance(rows[0]["loss"], float) and rows[0]["images_per_s"] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_and_eval_on_cuda(tmp_path):
    run = tmp_path / "run"
    overrides = [a for o in TINY + ["steps=4", "device=cuda"] for a in ("--set", o)]
    assert cli_main(["train", *overrides, "--out", str(run), "--no-progress"]) == 0
    assert cli_main(["eval", str(run), "--device", "cuda", "--no-fid", "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tokens"] == 16 * 64 and 0 < metrics["utilization"] <= 1 and metrics["psnr"] > 5


def test_config_overrides_and_errors(tmp_path):
    config = load_config(None, ["optim.lr=1e-4", "optim.milestones=[10, 20]", "model.quantizer_options={l2_norm: true}"])
    assert config.optim.lr == pytest.approx(1e-4) and config.optim.milestones == (10, 20)
    assert config.model.quantizer_options == {"l2_norm": True}
    with pytest.raises(ValueError, match="optim.lrr"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["optim.lr"])


def test_cli_encode_decode_round_trip(tmp_path):
    """The shards hold Tokenizer.encode of the same crops (with their labels); the PNGs are decode of those ids."""
    from PIL import Image

    from vqtok.data import build_dataset
    from vqtok.models import Tokenizer

    run = tmp_path / "run"
    train(tiny_config("steps=2"), run, progress=False)
    assert cli_main(["encode", str(run), "--data", "photos", "--length", "10", "--batch-size", "4",
                     "--shard-size", "6", "--out", str(tmp_path / "tokens")]) == 0
    index = json.loads((tmp_path / "tokens" / "index.json").read_text())
    assert index["count"] == 10 and index["dtype"] == "int16" and [s["count"] for s in index["shards"]] == [8, 2]
    shards = [np.load(tmp_path / "tokens" / s["tokens"]) for s in index["shards"]]
    labels = np.concatenate([np.load(tmp_path / "tokens" / s["labels"]) for s in index["shards"]])
    assert all(ids.dtype == np.int16 for ids in shards)
    ids = torch.from_numpy(np.concatenate(shards).astype(np.int64))  # (10, 8, 8)

    model = Tokenizer.from_pretrained(run)
    crops = build_dataset("photos", "val", size=32, length=10, train_crops=False)
    images = torch.stack([crops[i][0] for i in range(10)])
    assert torch.equal(ids, model.encode(images))
    assert labels.tolist() == [crops[i][1] for i in range(10)]
    assert len(ids.unique()) > 4  # a trained encoder's codes vary: all-zero shards would not pass the line above

    assert cli_main(["decode", str(run), str(tmp_path / "tokens"), "--out", str(tmp_path / "images")]) == 0
    pngs = sorted((tmp_path / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"00000-{i:06d}.png" for i in range(8)] + ["00001-000000.png", "00001-000001.png"]
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in pngs])  # (10, 32, 32, 3)
    expected = (model.decode(ids) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(pixels, expected)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_gloo_processes_stay_in_sync(tmp_path):
    run = tmp_path / "run"
    args = [a for override in TINY + ["steps=4", "model.quantizer=ema"] for a in ("--set", override)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "vqtok.cli", "train", *args, "--out", str(run),
               "--no-progress"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    end = log_rows(run, "end")[-1]
    assert len(end["rank_checksums"]) == 2 and end["rank_checksums"][0] == end["rank_checksums"][1]
    per_rank = end["tokens_train_per_rank"]
    # 48 crops over 2 ranks -> 3 batches of 8 per rank per epoch, 8x8 tokens each
    assert per_rank == [3 * 8 * 64, 3 * 8 * 64] and end["tokens_train"] == sum(per_rank)
    assert json.loads((run / "config.json").read_text())["world_size"] == 2


def test_quantizer_lr_scale_gives_the_quantizer_its_own_learning_rate(tmp_path):
    """Adam's first step moves every parameter with a gradient by about lr (m / sqrt(v) = sign g): the codebook's
    entries must move ~10x farther than the encoder's with quantizer_lr_scale=10, and equally with the default."""
    from vqtok.train.trainer import Trainer

    moved = {}
    for scale in (1.0, 10.0):
        config = tiny_config("optim.lr=1e-3", f"optim.quantizer_lr_scale={scale}")
        trainer = Trainer(config, tmp_path / f"run-{scale}", progress=False)
        codebook = trainer.model.quantizer.codebook.detach().clone()
        conv = trainer.model.encoder.conv_in.weight.detach().clone()
        x = torch.stack([trainer.train_set[i][0] for i in range(8)])
        trainer.train_step(x)
        step_codebook = (trainer.model.quantizer.codebook - codebook).abs().max().item()
        step_conv = (trainer.model.encoder.conv_in.weight - conv).abs().max().item()
        moved[scale] = step_codebook / step_conv
    assert 0.8 < moved[1.0] < 1.25 and 8.0 < moved[10.0] < 12.5, moved
    with pytest.raises(ValueError, match="quantizer_lr_scale"):
        Trainer(tiny_config("optim.quantizer_lr_scale=0"), tmp_path / "bad", progress=False)
