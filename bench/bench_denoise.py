"""Inference throughput: slices per second for 512² slices at several batch sizes, CPU and CUDA.

    python -m bench.bench_denoise [--weights W] [--batch-sizes 1 2 4 8] [--slices 16] [--json out.json]

Prints a table and writes JSON, both stating the machine. It times DenoiseEngine.denoise_hu, the
same call the node makes (scaling, padding, batching, correction), on CT-like random slices.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ldct_node.config import InferenceSettings
from ldct_node.net.inference import DenoiseEngine

SIZE = 512


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def time_engine(engine: DenoiseEngine, slices: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 200, size=(slices, SIZE, SIZE))
    engine.denoise_hu(hu[: engine.batch_size])  # warm-up: allocator, kernels, autotuning
    best = float("inf")
    for _ in range(repeats):
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.denoise_hu(hu)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return slices / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="default: the shipped student")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--slices", type=int, default=16, help="slices per timed run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs; the fastest counts")
    parser.add_argument("--json", type=Path, default=Path("bench/results/denoise.json"))
    args = parser.parse_args()

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for batch in args.batch_sizes:
            settings = InferenceSettings(device=device, batch_size=batch)
            engine = DenoiseEngine.from_path(args.weights, settings)
            rate = time_engine(engine, max(args.slices, batch), args.repeats)
            rows.append({"device": device, "batch_size": batch, "slices_per_s": round(rate, 3),
                         "mixed_precision": engine.mixed_precision})
            print(f"{device:5s} batch {batch:3d}: {rate:8.2f} slices/s", flush=True)

    result = {"benchmark": "denoise 512x512", "weights": engine.card.model_id, "architecture": engine.card.settings,
              "machine": machine(), "rows": rows}
    print()
    print(f"machine: {result['machine']}")
    print(f"weights: {result['weights']}  {result['architecture']}")
    print(f"{'device':8s}{'batch':>6s}{'slices/s':>10s}")
    for row in rows:
        print(f"{row['device']:8s}{row['batch_size']:6d}{row['slices_per_s']:10.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
