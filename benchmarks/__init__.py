"""Parity and speed benchmarks of torch_fastaccum against PyTorch (python -m benchmarks)."""
