"""Pre-trained networks loaded from files that ship in installed packages (or local files): never downloaded.

- `build_encoder(name)` / `ENCODERS`: frozen ImageNet CNNs (efficientnet-lite0, mobilenetv2) and CLIP vision towers
  as `FeatureEncoder`s, images (B, 3, H, W) in [0, 1] -> feature maps (B, F, h, w). They feed an LC codebook's
  k-means (run under `torch.inference_mode()`) and the feature-matching perceptual loss (run with autograd).
- `InceptionFeatures`: the TF FID Inception-v3 with its fixed input pipeline, images in [0, 1] -> (N, 2048) pool3
  features for rFID / rKID.
- `vgg16_features`, `vgg16_taps`: torchvision's VGG16 convolutional stack and its five relu outputs, for LPIPS.
- `packaged_file`, `read_state_dict`, `load_weights`, `file_sha256`: locating, reading, strictly loading and hashing
  weight files.

This layer imports only `vqtok.core` from the rest of vqtok.
"""

from .efficientnet_lite import EfficientNetLite0, lite0_weights_path, load_efficientnet_lite0
from .encoders import ENCODERS, CLIPEncoder, CNNEncoder, FeatureEncoder, build_encoder, load_clip_vision
from .inception import InceptionFeatures, inception_input, inception_weights_path
from .mobilenetv2 import MobileNetV2, load_mobilenetv2, mobilenetv2_weights_path
from .vgg import VGG16_CFG, VGG16_CHANNELS, VGG16_TAPS, vgg16_feature_state, vgg16_features, vgg16_taps
from .weights import file_sha256, load_weights, packaged_file, read_state_dict

__all__ = [
    "ENCODERS", "FeatureEncoder", "CNNEncoder", "CLIPEncoder", "build_encoder", "load_clip_vision",
    "EfficientNetLite0", "load_efficientnet_lite0", "lite0_weights_path", "MobileNetV2", "load_mobilenetv2",
    "mobilenetv2_weights_path", "InceptionFeatures", "inception_input", "inception_weights_path",
    "VGG16_CFG", "VGG16_CHANNELS", "VGG16_TAPS", "vgg16_features", "vgg16_feature_state", "vgg16_taps",
    "packaged_file", "read_state_dict", "load_weights", "file_sha256",
]
