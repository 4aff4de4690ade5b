"""Reference models."""

from fedmosaic.models.zoo import MLP, MODEL_KINDS, LogisticRegression, SmallCNN, build_model

__all__ = ["MLP", "MODEL_KINDS", "LogisticRegression", "SmallCNN", "build_model"]
