"""``ldct-node denoise IN_DIR OUT_DIR``: denoise every axial CT series of a folder tree offline.

IN_DIR is what a PACS export or a CD gives: any file names, several series mixed, non-CT and
non-DICOM files among them. Each derived series goes to OUT_DIR/<derived SeriesInstanceUID>/.
Files that are not axial CT images are reported with the reason and skipped. Each series' HU
fidelity (noise SD before/after, mean soft-tissue change, low-pass change) is printed in the
summary; a series beyond a ``[fidelity]`` limit fails with that reason and its folder is removed,
as the node would not send it. Exit status 0 when every CT series was written; 1 when a series
failed or none was found; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import shutil
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from ldct_node.config import load_config, validate
from ldct_node.dicom.fidelity import FidelitySummary
from ldct_node.dicom.series import ScanResult, scan_tree
from ldct_node.errors import CommandError
from ldct_node.logs import one_line
from ldct_node.net.inference import DenoiseEngine
from ldct_node.node.denoise_series import SeriesResult, denoise_instances, output_series_uid

MAX_SKIPPED_LISTED = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("in_dir", type=Path, metavar="IN_DIR", help="folder tree of DICOM files")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="receives one folder per derived series")
    parser.add_argument("--weights", type=Path, help="weights .safetensors (default: the shipped TSC-Net student)")
    parser.add_argument("--config", type=Path,
                        help="TOML configuration ([model], [inference], [fidelity], [derive] apply)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides inference.device)")
    parser.add_argument("--batch-size", type=int, help="slices per forward pass (overrides inference.batch_size)")
    parser.add_argument("--threads", type=int, help="CPU threads (overrides inference.threads)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    overrides = {k: v for k, v in (("device", args.device), ("batch_size", args.batch_size), ("threads", args.threads)) if v is not None}
    cfg = dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, **overrides))
    validate(cfg)
    if not args.in_dir.is_dir():
        raise CommandError(f"input folder {args.in_dir} does not exist or is not a folder")
    if args.out_dir.resolve().is_relative_to(args.in_dir.resolve()):
        raise CommandError(f"output folder {args.out_dir} lies inside the input folder: choose an output folder outside {args.in_dir}")

    started = time.monotonic()
    scan = scan_tree(args.in_dir)
    if not scan.series:
        print(skipped_report(scan))
        print(f"no axial CT series found under {args.in_dir}: nothing was written")
        return 1
    engine = DenoiseEngine.from_path(args.weights or cfg.model.weights, cfg.inference)

    results: list[SeriesResult] = []
    failures: list[str] = []
    total = sum(len(instances) for instances in scan.series.values())
    with tqdm(total=total, unit="slice", disable=args.no_progress, desc="denoising") as bar:
        for series_uid, instances in scan.series.items():
            try:
                out = args.out_dir / output_series_uid(series_uid, engine, cfg.derive)
                result = denoise_instances(series_uid, instances, out, engine, cfg.derive, progress=bar.update,
                                           fidelity=cfg.fidelity)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise CommandError(f"disk full while writing to {args.out_dir}: free space and run again (the re-run writes the same UIDs)") from None
                failures.append(f"series {series_uid}: {one_line(exc)}")
                continue
            except Exception as exc:  # noqa: BLE001 - a damaged series must not stop the others; each is reported
                failures.append(f"series {series_uid}: {one_line(exc)}")
                continue
            if result.fidelity_failure:
                shutil.rmtree(out, ignore_errors=True)
                failures.append(f"series {series_uid}: {result.fidelity_failure} (output removed; "
                                f"{fidelity_text(result.fidelity)})")
                continue
            results.append(result)
    print(summary(results, scan, time.monotonic() - started))
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0


def skipped_report(scan: ScanResult) -> str:
    if not scan.skipped:
        return "skipped files: none"
    counts = Counter(s.reason for s in scan.skipped)
    lines = [f"skipped files: {len(scan.skipped)}"]
    lines += [f"  {n:5d}  {reason}" for reason, n in counts.most_common()]
    lines += [f"  {s.path}: {s.reason}" for s in scan.skipped[:MAX_SKIPPED_LISTED]]
    if len(scan.skipped) > MAX_SKIPPED_LISTED:
        lines.append(f"  ... and {len(scan.skipped) - MAX_SKIPPED_LISTED} more")
    return "\n".join(lines)


def _hu(value: float | None, sign: bool = False) -> str:
    return "n/a" if value is None else f"{value:+.1f}" if sign else f"{value:.1f}"


def fidelity_text(f: FidelitySummary | None) -> str:
    """The HU fidelity measures in one phrase ("n/a": no soft tissue to measure)."""
    if f is None:
        return "HU fidelity not measured"
    return (f"noise SD {_hu(f.noise_sd_before)} -> {_hu(f.noise_sd_after)} HU, "
            f"mean soft-tissue change {_hu(f.mean_hu_change, sign=True)} HU, "
            f"low-pass p95 {_hu(f.lowpass_p95_hu)} HU")


def summary(results: list[SeriesResult], scan: ScanResult, seconds: float) -> str:
    slices = sum(r.slices for r in results)
    lines = [f"{r.source_series_uid} -> {r.derived_series_uid} ({r.slices} slices, {r.seconds:.1f} s; "
             f"{fidelity_text(r.fidelity)})" for r in results]
    rate = slices / seconds if seconds > 0 else 0.0
    lines.append(f"series: {len(results)}  slices: {slices}  seconds: {seconds:.1f}  slices/s: {rate:.2f}")
    lines.append(skipped_report(scan))
    return "\n".join(lines)
