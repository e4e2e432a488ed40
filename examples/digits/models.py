"""The digits example's models: a CNN teacher and a much smaller CNN student.

Both take (N, 1, 8, 8) images with pixel values in [0, 1] and return (N, 10) logits.
Recipes name them as `models.py:teacher` and `models.py:student`, and their layers by module
path (`features.5`, `classifier.0`).
"""

import torch
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self, features: nn.Sequential, classifier: nn.Sequential):
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def teacher(width: int = 32, dropout: float = 0.3) -> nn.Module:
    """About 226k parameters; teacher.yaml trains it to ~99.8% eval accuracy."""
    w = width
    features = nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1),
        nn.BatchNorm2d(w),
        nn.ReLU(),  # 0-2: 8x8
        nn.Conv2d(w, 2 * w, 3, padding=1),
        nn.BatchNorm2d(2 * w),
        nn.ReLU(),  # 3-5: 8x8
        nn.MaxPool2d(2),  # 6: 4x4
        nn.Conv2d(2 * w, 4 * w, 3, padding=1),
        nn.BatchNorm2d(4 * w),
        nn.ReLU(),  # 7-9: 4x4
        nn.MaxPool2d(2),  # 10: 2x2
    )
    classifier = nn.Sequential(
        nn.Linear(16 * w, 8 * w), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8 * w, 10)
    )
    return DigitsCNN(features, classifier)


def student(width: int = 8) -> nn.Module:
    """About 2k parameters at width 8: two small convolutions and a linear classifier."""
    w = width
    features = nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1),
        nn.ReLU(),  # 0-1: 8x8
        nn.MaxPool2d(2),  # 2: 4x4
        nn.Conv2d(w, 2 * w, 3, padding=1),
        nn.ReLU(),  # 3-4: 4x4
        nn.MaxPool2d(2),  # 5: 2x2
    )
    return DigitsCNN(features, nn.Sequential(nn.Linear(8 * w, 10)))
