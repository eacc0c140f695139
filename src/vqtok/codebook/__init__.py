"""LC codebooks (VQGAN-LC, Zhu et al. 2024): features of a frozen pre-trained encoder (`vqtok.backbones`) over an
image source, each feature map average-pooled to a grid of cells, one vector per cell, clustered to K centres and
saved as a (K, F) .safetensors file that `build_quantizer("lc", codebook=path)` reads.

    path = build_codebook(encoder="efficientnet-lite0", source="photos", size=100_000, out="codebook.safetensors")
    codebook, metadata = read_codebook_file(path)     # (K, F) float32, dict of strings

Command line: `vqtok codebook build --encoder NAME --data SOURCE --size K --out FILE`.
"""

from ..backbones import ENCODERS, FeatureEncoder, build_encoder  # re-exported: the encoders a codebook is built with
from ..core.codebook_file import read_codebook_file, read_metadata, save_codebook
from .build import build_codebook, default_cache_dir
from .cluster import CLUSTER_METHODS, allocate, assign, cluster, kmeans
from .features import FeatureShards, extract_features, pool_to_grid

__all__ = [
    "ENCODERS", "FeatureEncoder", "build_encoder", "extract_features", "FeatureShards", "pool_to_grid", "cluster",
    "kmeans", "assign", "allocate", "CLUSTER_METHODS", "build_codebook", "default_cache_dir", "save_codebook",
    "read_codebook_file", "read_metadata",
]
