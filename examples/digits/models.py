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


class Block(nn.Module):
    """A pre-norm transformer block (timm layout: norm1, attn, norm2, mlp)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A plain-PyTorch ViT for 8x8 images: 2x2 patches (16 tokens) plus a class token.

    Modules follow timm's names (patch_embed.proj, cls_token, pos_embed, blocks.i, norm, head)
    so passes that know ViTs, such as MAE masking, find their way around it."""

    def __init__(
        self,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        patch: int = 2,
        image: int = 8,
        classes: int = 10,
    ):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, dim, patch, stride=patch)
        tokens = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [N, 16, dim]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit(dim: int = 64, depth: int = 4, heads: int = 4) -> nn.Module:
    return ViT(dim, depth, heads)


class MLP(nn.Module):
    """Flattened pixels through `depth` Linear+GELU layers (module paths layers.i)."""

    def __init__(self, width: int = 64, depth: int = 3, classes: int = 10):
        super().__init__()
        self.layers = nn.Sequential(
            *[
                nn.Sequential(nn.Linear(64 if i == 0 else width, width), nn.GELU())
                for i in range(depth)
            ]
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x.flatten(1)))


def mlp(width: int = 64, depth: int = 3) -> nn.Module:
    return MLP(width, depth)


def vit_teacher() -> nn.Module:
    """The ViT teacher's architecture (vit_teacher.yaml, vit_teacher.safetensors)."""
    return ViT(dim=64, depth=6, heads=4)
