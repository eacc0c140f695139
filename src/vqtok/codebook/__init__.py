"""LC codebooks (VQGAN-LC, METHODS.md section 2): pre-trained encoder features of an image source, clustered to K
centres, saved as a .safetensors file that `build_quantizer("lc", codebook=path)` reads.

    path = build_codebook(encoder="efficientnet-lite0", source="photos", size=100_000, out="codebook.safetensors")
    codebook, metadata = read_codebook_file(path)     # (K, F) float32, dict of strings

Command line: `vqtok codebook build --encoder NAME --data SOURCE --size K --out FILE`.
"""

from .build import build_codebook, default_cache_dir
from .cluster import METHODS, allocate, assign, cluster, kmeans
from .encoders import ENCODERS, FeatureEncoder, build_encoder
from .features import FeatureShards, extract_features, pool_to_grid
from ..core.codebook_file import read_codebook_file, read_metadata, save_codebook

__all__ = [
    "ENCODERS", "FeatureEncoder", "build_encoder", "extract_features", "FeatureShards", "pool_to_grid", "cluster",
    "kmeans", "assign", "allocate", "METHODS", "build_codebook", "default_cache_dir", "save_codebook",
    "read_codebook_file", "read_metadata",
]
