"""RunDir: checkpoints written whole and kept by count, trainer.pt loaded weights-only (a pickle that would run code
is refused), the training histogram found without the trainer, and the RNG states round-tripped as tensors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vqtok.core.rundir import RunDir
from vqtok.train.loop import capture_rng_state, restore_rng_state


def usage_state(counts: list[int]) -> dict:
    return {"codebook_size": len(counts), "counts": torch.tensor(counts, dtype=torch.int64)}


def save(run: RunDir, step: int, keep: int = 2, **trainer_state) -> None:
    run.save_checkpoint(step, {"w": torch.full((2,), float(step))}, None, {"step": step, **trainer_state}, keep=keep)


def test_checkpoints_are_listed_oldest_first_and_only_the_newest_kept(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in (3, 6, 12):
        save(run, step)
    (run.checkpoints / "step-00000020.tmp").mkdir()  # an unfinished write never counts
    assert [p.name for p in run.list_checkpoints()] == ["step-00000006", "step-00000012"]
    model, ema, state = run.load_checkpoint(run.latest_checkpoint())
    assert torch.equal(model["w"], torch.full((2,), 12.0)) and ema is None and state["step"] == 12
    # the run directory's own files are the newest checkpoint's
    assert run.load_trainer_state()["step"] == 12
    assert run.model.stat().st_ino == (run.latest_checkpoint() / RunDir.MODEL).stat().st_ino


def test_trainer_state_that_needs_unpickling_is_refused(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    torch.save({"rng": np.random.get_state()}, run.trainer)  # numpy objects: loading them would unpickle
    with pytest.raises(ValueError, match="weights-only"):
        run.load_trainer_state()


def test_training_usage_is_the_last_epoch_else_the_current_one(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.training_usage_state() is None  # no trainer.pt
    save(run, 1, usage_train=usage_state([0, 0, 0]), usage_epoch=usage_state([1, 2, 0]))
    assert run.training_usage_state()["counts"].tolist() == [1, 2, 0]
    save(run, 2, usage_train=usage_state([5, 0, 1]), usage_epoch=usage_state([1, 2, 0]))
    assert run.training_usage_state()["counts"].tolist() == [5, 0, 1]


def test_config_is_updated_one_section_at_a_time_and_a_missing_one_is_a_clear_error(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="vqtok run directory"):
        run.read_config()
    run.write_config({"steps": 5, "model": {"preset": "tiny"}})
    run.update_config("model", {"preset": "f16"})
    assert run.read_config() == {"steps": 5, "model": {"preset": "f16"}}
    assert sorted(p.name for p in run.path.iterdir()) == [RunDir.CONFIG]  # no temporary file left
    with pytest.raises(FileNotFoundError, match="weight EMA"):
        run.weights(ema=True)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # numpy caches the second Gaussian of a pair: part of its state
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.standard_normal(3), [random.random() for _ in range(3)])
    torch.save(state, tmp_path / "rng.pt")
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.standard_normal(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]
