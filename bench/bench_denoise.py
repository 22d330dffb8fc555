"""Inference throughput: slices per second for 512² slices at several batch sizes, CPU and CUDA.

    python -m bench.bench_denoise [--weights W] [--batch-sizes 1 2 4 8] [--slices 16] [--json out.json]

Prints a table and writes JSON, both stating the machine. It times DenoiseEngine.denoise_hu, the
same call the node makes (scaling, padding, batching, correction), on CT-like random slices.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ldct_node.config import InferenceSettings
from ldct_node.net.inference import DenoiseEngine
from ldct_node.net.model import ModulatedDeformConv

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


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(call, device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` runs of call(), in seconds, after one warm-up (kernels, autotuning, compilation)."""
    call()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def deform_share(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> float:
    """Fraction of one eager forward pass spent in the modulated deformable convolutions."""
    spent = [0.0]

    def before(module, inputs):
        synchronize(device)
        module.started = time.perf_counter()

    def after(module, inputs, output):
        synchronize(device)
        spent[0] += time.perf_counter() - module.started

    hooks = [h for m in model.modules() if isinstance(m, ModulatedDeformConv)
             for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        total = timed(lambda: model(x), device, 1)
        spent[0] = 0.0
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return spent[0] / total if total else 0.0


def variant_row(engine: DenoiseEngine, device: torch.device, dtype: str, compile_mode: str, layout: str, batch: int,
                repeats: int, reference: dict) -> dict:
    row = {"device": device.type, "dtype": dtype, "compile": compile_mode, "layout": layout, "batch_size": batch}
    model = copy.deepcopy(engine.model).to(device, memory_format=LAYOUTS[layout]).eval()
    torch.manual_seed(0)
    x = torch.rand(batch, engine.in_slices, SIZE, SIZE, device=device).contiguous(memory_format=LAYOUTS[layout])
    try:
        net = model if compile_mode == "none" else torch.compile(model, mode=compile_mode)

        @torch.inference_mode()
        def forward():
            with torch.autocast(device_type=device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
                return net(x)

        seconds = timed(forward, device, repeats)
        out = forward().float()
    except Exception as exc:  # noqa: BLE001 - a variant this machine cannot run is reported, not fatal
        return {**row, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    key = (device.type, batch)
    reference.setdefault(key, out)
    row["slices_per_s"] = round(batch / seconds, 3)
    row["max_change_hu"] = round(float((out - reference[key]).abs().max()) * engine.scaling.span, 3)
    if compile_mode == "none":
        with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
            row["deform_share"] = round(deform_share(model, x, device), 3)
    return row


def bench_variants(engine: DenoiseEngine, devices: list[str], dtypes: list[str], compile_modes: list[str],
                   batch_sizes: list[int], repeats: int) -> list[dict]:
    rows, reference = [], {}
    # fp32 eager contiguous first: it is every other variant's reference.
    order = sorted(itertools.product(dtypes, compile_modes, LAYOUTS),
                   key=lambda v: (v[0] != "fp32", v[1] != "none", v[2] != "contiguous"))
    for device in devices:
        for batch in batch_sizes:
            for dtype, compile_mode, layout in order:
                row = variant_row(engine, torch.device(device), dtype, compile_mode, layout, batch, repeats, reference)
                rows.append(row)
                print(format_variant(row), flush=True)
    return rows


def format_variant(row: dict) -> str:
    head = f"{row['device']:5s} {row['dtype']:5s} {row['compile']:16s} {row['layout']:14s} {row['batch_size']:5d}"
    if "error" in row:
        return f"{head}  not run: {row['error']}"
    share = f"{row['deform_share']:8.2f}" if "deform_share" in row else f"{'':8s}"
    return f"{head} {row['slices_per_s']:10.2f} {row['max_change_hu']:8.3f} {share}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="default: the shipped student")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--slices", type=int, default=16, help="slices per timed run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs; the fastest counts")
    parser.add_argument("--json", type=Path, default=Path("bench/results/denoise.json"))
    parser.add_argument("--variants", action="store_true", help="also time the network per dtype, compile mode and layout")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "fp16", "bf16"])
    parser.add_argument("--compile", nargs="+", default=["none", "default", "reduce-overhead"], metavar="MODE",
                        help="torch.compile modes ('none': eager; 'reduce-overhead' uses CUDA graphs)")
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
    if args.variants:
        print()
        print(f"{'device':5s} {'dtype':5s} {'compile':16s} {'layout':14s} {'batch':>5s} {'slices/s':>10s} {'max ΔHU':>8s} {'deform':>8s}")
        result["variants"] = bench_variants(engine, devices, args.dtypes, args.compile, args.batch_sizes, args.repeats)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
