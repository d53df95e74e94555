"""Timing helpers shared by the benchmark scripts."""
import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
