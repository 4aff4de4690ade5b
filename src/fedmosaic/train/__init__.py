"""Local training: the Trainer protocol and the PyTorch trainer."""

from fedmosaic.train.base import Dataset, FitConfig, FitResult, Trainer, TrainerWrapper
from fedmosaic.train.torch_trainer import TorchTrainer

__all__ = ["Dataset", "FitConfig", "FitResult", "TorchTrainer", "Trainer", "TrainerWrapper"]
