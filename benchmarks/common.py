"""What the benchmark scripts share: the summary of repeated measurements, the machine they ran
on, and the JSON file they write."""

import json
import os
import platform
import statistics

import torch
import torchvision


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def machine(device):
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if str(device).startswith("cuda") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }


def write_json(path, figures):
    """Writes `figures` to `path`, if given."""
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=2)
