"""The tokenizer around the quantizer: taming's encoder/decoder, PatchGAN, GAN/LeCAM losses, perceptual loss."""

from .autoencoder import PRESETS, AutoencoderConfig, Decoder, Encoder, get_preset
from .discriminator import NLayerDiscriminator, weights_init
from .losses import (
    LeCAM,
    adaptive_generator_weight,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_g_loss,
    vanilla_d_loss,
)
from .perceptual import LPIPS, FeatureMatchingLoss, PerceptualLoss, build_perceptual_loss
from .tokenizer import Tokenizer, TokenizerConfig, TokenizerOutput

__all__ = [
    "PRESETS", "AutoencoderConfig", "Decoder", "Encoder", "get_preset",
    "NLayerDiscriminator", "weights_init",
    "LeCAM", "adaptive_generator_weight", "hinge_d_loss", "hinge_g_loss", "non_saturating_g_loss", "vanilla_d_loss",
    "LPIPS", "FeatureMatchingLoss", "PerceptualLoss", "build_perceptual_loss",
    "Tokenizer", "TokenizerConfig", "TokenizerOutput",
]
