"""Helpers shared by the benchmark scripts: timing, and what every result names."""
import datetime
import json
import os

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_description(device: torch.device) -> dict:
    """The device, the torch version and the date, as every printed header and JSON file gives them."""
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "torch": torch.__version__, "date": datetime.date.today().isoformat()}


def write_json(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
