"""vqtok.metrics.classifier: the small CNN that judges samples' classes, its training, its cache, its inputs."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_colour_folder

from vqtok.metrics import class_accuracy, classifier, load_or_train_classifier


@pytest.fixture(autouse=True)
def one_thread():
    """Small convolutions: one thread is faster than two on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bars(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 3, 32, 32) noise with a bright bar at a random place: horizontal (class 0) or vertical (class 1)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 100, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    where = torch.randint(4, 28, (n,), generator=g)
    for i in range(n):
        if labels[i] == 0:
            images[i, :, where[i]:where[i] + 2, :] = 255
        else:
            images[i, :, :, where[i]:where[i] + 2] = 255
    return images, labels


def test_small_cnn_learns_a_synthetic_two_class_task_deterministically():
    train, val = bars(512, 0), bars(200, 1)
    recipe = {"epochs": 3, "batch_size": 32}
    model, info = classifier.train_classifier(train, val, classes=2, recipe=recipe)
    assert info["test_accuracy"] >= 0.9 and info["classes"] == 2 and info["train_images"] == 512
    assert class_accuracy(model, val[0], val[1]) == info["test_accuracy"]
    again, _ = classifier.train_classifier(train, val, classes=2, recipe=recipe)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_class_accuracy_accepts_every_image_form():
    images, labels = bars(64, 2)
    model, _ = classifier.train_classifier((images, labels), (images, labels), classes=2,
                                           recipe={"epochs": 1, "batch_size": 32})
    reference = class_accuracy(model, images.float() / 255, labels)
    nhwc = images.permute(0, 2, 3, 1).numpy()  # ADM's .npz layout
    batches = [(images[i:i + 10].float() / 255, labels[i:i + 10]) for i in range(0, 64, 10)]
    assert class_accuracy(model, images, labels) == reference
    assert class_accuracy(model, nhwc, labels.numpy(), batch_size=7) == reference
    preds = classifier.predict(model, batches)
    assert float((preds == labels).double().mean()) == reference
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(model, images, labels[:10])
    with pytest.raises(ValueError, match="uint8"):
        class_accuracy(model, nhwc.astype(np.float32), labels)


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """train/ and val/ with two classes: reddish and bluish 32 px noise images."""
    return write_colour_folder(tmp_path_factory.mktemp("colours"), train=16, val=8)


def test_the_classifier_is_cached_per_dataset_and_a_corrupt_cache_is_retrained(colour_folder, tmp_path, monkeypatch,
                                                                                caplog):
    calls = []
    train = classifier.train_classifier
    monkeypatch.setattr(classifier, "train_classifier", lambda *a, **k: calls.append(1) or train(*a, **k))
    cache = tmp_path / "cache"
    model, info = load_or_train_classifier(str(colour_folder), size=32, cache_dir=cache)
    assert len(calls) == 1 and info["cached"] is False and info["classes"] == 2 and info["test_images"] == 16
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    saved = json.loads((cache / files[0]).read_text())
    assert saved["test_accuracy"] == info["test_accuracy"] and saved["recipe"]["epochs"] == 2
    assert saved["data"]["train"]["count"] == 32

    loaded, again = load_or_train_classifier(str(colour_folder), size=32, cache_dir=cache)
    assert len(calls) == 1 and again["cached"] is True and again["test_accuracy"] == info["test_accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    load_or_train_classifier(str(colour_folder), size=16, cache_dir=cache)  # another size is another dataset
    assert len(calls) == 2

    (cache / files[1]).write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="vqtok.metrics"):
        _, retrained = load_or_train_classifier(str(colour_folder), size=32, cache_dir=cache)
    assert len(calls) == 3 and retrained["cached"] is False and "training it again" in caplog.text
    assert load_or_train_classifier(str(colour_folder), size=32, cache_dir=cache)[1]["cached"] is True


def test_sources_without_shared_classes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no classes shared"):
        load_or_train_classifier("photos", size=32, cache_dir=tmp_path)
    for split in ("train", "val"):
        (tmp_path / "one" / split / "only").mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "one" / split / "only" / "a.png")
    with pytest.raises(ValueError, match="2 or more classes"):
        load_or_train_classifier(str(tmp_path / "one"), size=32, cache_dir=tmp_path / "cache")
