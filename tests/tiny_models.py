"""Tiny models for tests; recipes name them as `<this file>:function`."""

import torch
from torch import nn


class MLP(nn.Module):
    """`depth` Linear+ReLU layers under `layers.i`, then a head; optional dropout/BatchNorm."""

    def __init__(
        self,
        width: int = 16,
        depth: int = 6,
        inputs: int = 64,
        classes: int = 10,
        dropout: float = 0.0,
        norm: bool = False,
    ):
        super().__init__()
        blocks = []
        for i in range(depth):
            parts: list[nn.Module] = [nn.Linear(inputs if i == 0 else width, width)]
            if norm:
                parts.append(nn.BatchNorm1d(width))
            parts.append(nn.ReLU())
            if dropout:
                parts.append(nn.Dropout(dropout))
            blocks.append(nn.Sequential(*parts))
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x.flatten(1)))


def mlp(width: int = 16, depth: int = 6, dropout: float = 0.0, norm: bool = False) -> nn.Module:
    return MLP(width=width, depth=depth, dropout=dropout, norm=norm)


class SmallCNN(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(width * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x).flatten(1)))


def cnn(width: int = 4) -> nn.Module:
    return SmallCNN(width)


def not_a_module() -> str:
    return "not a module"


class _Residual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.skip(x))


class ResNetLike(nn.Module):
    """torchvision's layout: a stem Sequential, stages layer1..layer4, pooling and fc."""

    def __init__(self, width: int = 4):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(_Residual(w, w, 1), _Residual(w, w, 1))
        self.layer2 = nn.Sequential(_Residual(w, 2 * w, 2))
        self.layer3 = nn.Sequential(_Residual(2 * w, 4 * w, 2))
        self.layer4 = nn.Sequential(_Residual(4 * w, 4 * w, 1))
        self.fc = nn.Linear(4 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def resnet(width: int = 4) -> nn.Module:
    return ResNetLike(width)
