"""Helpers shared by the benchmark scripts: timing, and what every result names."""
import datetime
import json
import os
import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(function, device: torch.device, repetitions: int, warmup: int = 3) -> float:
    """Mean seconds of `function()` over `repetitions` calls after `warmup` untimed ones, the
    device's queue drained before and after."""
    for _ in range(warmup):
        function()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repetitions):
        function()
    synchronize(device)
    return (time.perf_counter() - started) / repetitions


def run_description(device: torch.device) -> dict:
    """The device, the torch version and the date, as every printed header and JSON file gives them."""
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "torch": torch.__version__, "date": datetime.date.today().isoformat()}


def write_json(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
