"""End-to-end training with torch_fastaccum: synthetic images, DataLoader
workers, autocast + GradScaler, gradient accumulation, StepLR, and a
per-class precision / recall / F1 report.

    python examples/train_seed_pipeline.py              # AccumOptimizer + our GradScaler
    python examples/train_seed_pipeline.py --reference  # torch.optim.SGD + torch's, loss / K
    python examples/train_seed_pipeline.py --quick      # a few seconds, for CI

Nothing is downloaded: each image is generated from its index, so the data is
the same in every run and every worker.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torch_fastaccum import AccumOptimizer, GradScaler


class SyntheticShapes(Dataset):
    """32x32 RGB images of `num_classes` classes: each class has its own
    colour and stripe frequency, buried in noise. Item i is a pure function
    of (seed, i), so workers need no shared state."""

    def __init__(self, size: int, num_classes: int = 10, seed: int = 0):
        self.size, self.num_classes, self.seed = size, num_classes, seed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        y = int(torch.randint(0, self.num_classes, (), generator=g))
        xs = torch.linspace(0, 1, 32)
        freq = 1 + y % 5
        stripes = torch.sin(2 * torch.pi * freq * (xs.view(1, -1) + xs.view(-1, 1) * (y // 5)))
        colour = torch.tensor([(y * 37 % 10) / 10, (y * 53 % 10) / 10, (y * 71 % 10) / 10]).view(3, 1, 1)
        x = colour * stripes + 1.6 * torch.randn(3, 32, 32, generator=g)
        return x, y


class Net(nn.Module):
    """The classic CIFAR-10 tutorial CNN."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done, self.start = total, label, 0, time.perf_counter()
        self.last = -1

    def update(self, n: int = 1, **info):
        self.done += n
        pct = 100 * self.done // self.total
        if pct == self.last and self.done != self.total:
            return
        self.last = pct
        bar = "#" * (pct // 4) + "-" * (25 - pct // 4)
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        sys.stderr.write(f"\r{self.label} [{bar}] {pct:3d}% {time.perf_counter() - self.start:6.1f}s {extra}")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def per_class_report(confusion: torch.Tensor) -> tuple[str, dict]:
    tp = confusion.diag().double()
    predicted = confusion.sum(0).double()
    actual = confusion.sum(1).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    lines = ["class  precision  recall     f1  support"]
    for c in range(confusion.shape[0]):
        lines.append(f"{c:5d}  {precision[c]:9.3f}  {recall[c]:6.3f}  {f1[c]:5.3f}  {int(actual[c]):7d}")
    accuracy = float(tp.sum() / actual.sum())
    lines.append(f"macro  {precision.mean():9.3f}  {recall.mean():6.3f}  {f1.mean():5.3f}  {int(actual.sum()):7d}")
    lines.append(f"accuracy {accuracy:.3f}")
    return "\n".join(lines), {"accuracy": accuracy, "macro_f1": float(f1.mean())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", action="store_true",
                    help="train with torch.optim.SGD + torch.amp.GradScaler (loss / K) instead")
    ap.add_argument("--quick", action="store_true", help="tiny run (seconds), as CI does")
    ap.add_argument("--epochs", type=int, default=None, help="epochs (default 4, quick 1)")
    ap.add_argument("--train-size", type=int, default=None, help="training images (default 8192, quick 512)")
    ap.add_argument("--batch-size", type=int, default=32, help="micro-batch size")
    ap.add_argument("--accumulation-steps", type=int, default=4, help="K micro-batches per update")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    epochs = args.epochs or (1 if args.quick else 4)
    train_size = args.train_size or (512 if args.quick else 8192)
    k = args.accumulation_steps
    device = torch.device(args.device)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    torch.manual_seed(args.seed)
    train = DataLoader(SyntheticShapes(train_size, seed=args.seed), batch_size=args.batch_size, shuffle=True,
                       num_workers=args.workers, drop_last=True, persistent_workers=args.workers > 0)
    test = DataLoader(SyntheticShapes(max(train_size // 4, 256), seed=args.seed + 1), batch_size=256,
                      num_workers=args.workers)
    model = Net().to(device)
    hyper = dict(lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if args.reference:
        opt = torch.optim.SGD(model.parameters(), **hyper)
        scaler = torch.amp.GradScaler(device.type)
    else:
        opt = AccumOptimizer(model.parameters(), accumulation_steps=k, **hyper)
        scaler = GradScaler(device.type)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, epochs // 2), gamma=0.3)
    loss_fn = nn.CrossEntropyLoss()
    name = "torch.optim.SGD" if args.reference else "AccumOptimizer"
    print(f"{name}, K={k}, {epochs} epoch(s) of {train_size} images on {device} (autocast {amp_dtype})")

    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        bar = Progress(len(train), f"epoch {epoch + 1}/{epochs}")
        for i, (x, y) in enumerate(train):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if args.reference:
                with torch.autocast(device.type, dtype=amp_dtype):
                    loss = loss_fn(model(x), y)
                scaler.scale(loss / k).backward()
                if (i + 1) % k == 0:
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad()
            else:
                opt.zero_grad()  # acts only right after an update
                with opt.accumulate(model), torch.autocast(device.type, dtype=amp_dtype):
                    loss = loss_fn(model(x), y)
                scaler.scale(loss).backward()
                scaler.step(opt)  # updates on every K-th micro-batch
                scaler.update()
            bar.update(loss=loss.item(), lr=opt.param_groups[0]["lr"])
        sched.step()
    train_s = time.perf_counter() - start

    model.eval()
    confusion = torch.zeros(10, 10, dtype=torch.long)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype):
        for x, y in test:
            pred = model(x.to(device)).argmax(1).cpu()
            confusion += torch.bincount(y * 10 + pred, minlength=100).view(10, 10)
    report, summary = per_class_report(confusion)
    print(report)
    print(f"training time {train_s:.1f}s, final scale {scaler.get_scale():g}")
    summary.update(train_seconds=train_s, optimizer=name)
    return summary


if __name__ == "__main__":
    main()
