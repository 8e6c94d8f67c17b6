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


def synthetic_batches(n: int, batch: int, seed: int, num_classes: int = 10):
    """Random CIFAR-shaped images whose class shifts the mean of one channel
    region, so the loss actually falls; fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, num_classes, (batch,), generator=g)
        x = torch.randn(batch, 3, 32, 32, generator=g)
        x[:, y % 3, :8, :8] += (y.float() / num_classes).view(-1, 1, 1) * 2
        out.append((x, y))
    return out
