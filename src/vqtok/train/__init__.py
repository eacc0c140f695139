"""Training: config, the trainer (single process or torchrun data parallel), checkpoints, CLI train/encode/decode."""

from .config import CodebookConfig, DataConfig, LossConfig, OptimConfig, TrainConfig, load_config
from .trainer import Trainer, train

__all__ = ["CodebookConfig", "DataConfig", "LossConfig", "OptimConfig", "TrainConfig", "Trainer", "load_config", "train"]
