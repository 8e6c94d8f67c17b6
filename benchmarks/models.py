"""Small models and data shared by the benchmarks and the example."""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    """The classic CIFAR-10 tutorial CNN (conv-pool-conv-pool-fc-fc-fc)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def synthetic_batches(n: int, batch: int, seed: int, num_classes: int = 10, signal: float = 1.0,
                      label_noise: float = 0.2):
    """`n` micro-batches of CIFAR-shaped images with learnable labels, fixed by `seed`.

    Each class has a pattern drawn once from the seed: 3 channels of 4 x 4
    blocks of 8 x 8 pixels, each block +-1 at random. An image is its class's
    pattern times `signal` plus unit Gaussian noise, so the class is a
    (noisy) function of the image that the CNN learns within tens of updates
    and the loss falls from ln(num_classes)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (num_classes, 3, 4, 4), generator=g).float() * 2 - 1
    patterns = signs.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3) * signal
    out = []
    for _ in range(n):
        y = torch.randint(0, num_classes, (batch,), generator=g)
        x = torch.randn(batch, 3, 32, 32, generator=g) + patterns[y]
        flip = torch.rand(batch, generator=g) < label_noise
        y = torch.where(flip, torch.randint(0, num_classes, (batch,), generator=g), y)
        out.append((x, y))
    return out
