"""Noise power spectra that training covers: the simulated low-dose noise at the ends and middle of
the dose and kernel ranges ``ldct-node train`` draws from (train/bank.py).

    python -m bench.noise_spectra BANK [--source pancreas-ct-cb001] [--out weights/evaluation]

For each (dose, kernel) it draws the noise a noise-bank training sample would get on one whole slice,
takes the 2-D noise power spectrum of a square region inside the body, and averages it over rings.
Prints a table (noise σ, peak frequency and median frequency f50 of the spectrum, in cycles/mm) and
writes ``noise_spectra.json`` and ``noise_spectra.png`` (radial NPS curves) to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ldct_train.bank import DOSE_RANGE, KERNEL_ALPHA_RANGE, KERNEL_CUTOFF_RANGE, VALIDATION_KERNEL, load_bank, noise_for  # noqa: E402
from ldct_train.simulate import Kernel  # noqa: E402

KERNELS = {
    "smoothest": Kernel(alpha=KERNEL_ALPHA_RANGE[0], cutoff=KERNEL_CUTOFF_RANGE[0]),
    "validation": VALIDATION_KERNEL,
    "sharpest": Kernel(alpha=KERNEL_ALPHA_RANGE[1], cutoff=KERNEL_CUTOFF_RANGE[1]),
}
DOSES = (DOSE_RANGE[0], 0.25, DOSE_RANGE[1])
ROI = 128
RINGS = 32


def body_roi(hu: np.ndarray, size: int) -> tuple[slice, slice]:
    """The square of side ``size`` nearest the body's centre of mass (pixels above −500 HU)."""
    rows, cols = np.nonzero(hu > -500)
    top = int(np.clip(rows.mean() - size / 2, 0, hu.shape[0] - size))
    left = int(np.clip(cols.mean() - size / 2, 0, hu.shape[1] - size))
    return slice(top, top + size), slice(left, left + size)


def radial_nps(noise: np.ndarray, pixel_mm: float, rings: int) -> tuple[np.ndarray, np.ndarray]:
    """Ring-averaged NPS (HU² mm²) against spatial frequency (cycles/mm), DC excluded."""
    n = noise.shape[0]
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(noise - noise.mean()))) ** 2 * pixel_mm**2 / (n * n)
    f = np.fft.fftshift(np.fft.fftfreq(n, d=pixel_mm))
    radius = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    edges = np.linspace(0.0, 0.5 / pixel_mm, rings + 1)
    which = np.digitize(radius.ravel(), edges) - 1
    inside = (which >= 0) & (which < rings) & (radius.ravel() > 0)
    power = np.bincount(which[inside], spectrum.ravel()[inside], rings) / np.maximum(np.bincount(which[inside], minlength=rings), 1)
    return (edges[:-1] + edges[1:]) / 2, power


def f50(freq: np.ndarray, power: np.ndarray) -> float:
    """Frequency below which half the noise power (ring area weighted) lies."""
    cumulative = np.cumsum(power * freq)
    return float(freq[np.searchsorted(cumulative, cumulative[-1] / 2)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bank", type=Path, help="noise bank folder written by `ldct-node prepare`")
    parser.add_argument("--source", default="pancreas-ct-cb001", help="bank source whose middle slice is used")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    slices = [s for s in load_bank(args.bank, "train") if s.record["id"] == args.source]
    if not slices:
        raise SystemExit(f"noise bank {args.bank} has no training slices of source {args.source}: pass another --source")
    item = slices[len(slices) // 2]
    window = (slice(0, item.hu.shape[0]), slice(0, item.hu.shape[1]))
    roi = body_roi(item.hu, ROI)
    rows, curves = [], {}
    for dose in DOSES:
        for name, kernel in KERNELS.items():
            noise = noise_for(item, window, dose, kernel, np.random.default_rng(args.seed))[roi]
            freq, power = radial_nps(noise, item.pixel_mm, RINGS)
            curves[f"{dose:g} {name}"] = (freq, power)
            rows.append({"dose": dose, "kernel": name, "alpha": kernel.alpha, "cutoff_cycles_per_px": kernel.cutoff,
                         "noise_sd_hu": float(noise.std()), "peak_cycles_per_mm": float(freq[np.argmax(power)]),
                         "f50_cycles_per_mm": f50(freq, power)})
    print(f"source {args.source}, slice {item.record['source_file']}, {item.pixel_mm:.3f} mm pixels, ROI {ROI}² in the body")
    print(f"{'dose':>6} {'kernel':>11} {'σ [HU]':>8} {'peak [c/mm]':>12} {'f50 [c/mm]':>11}")
    for r in rows:
        print(f"{r['dose']:>6g} {r['kernel']:>11} {r['noise_sd_hu']:>8.1f} {r['peak_cycles_per_mm']:>12.3f} {r['f50_cycles_per_mm']:>11.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "noise_spectra.json").write_text(json.dumps(
        {"source": args.source, "slice": item.record["source_file"], "pixel_mm": item.pixel_mm, "roi_px": ROI, "rows": rows,
         "curves": {k: {"cycles_per_mm": f.tolist(), "nps_hu2_mm2": p.tolist()} for k, (f, p) in curves.items()}}, indent=1) + "\n")
    figure, axes = plt.subplots(1, len(DOSES), figsize=(4 * len(DOSES), 3.4), sharey=True)
    for ax, dose in zip(axes, DOSES):
        for name in KERNELS:
            freq, power = curves[f"{dose:g} {name}"]
            ax.plot(freq, power, label=name)
        ax.set_title(f"{dose * 100:g} % dose")
        ax.set_xlabel("spatial frequency [cycles/mm]")
        ax.set_yscale("log")
    axes[0].set_ylabel("NPS [HU² mm²]")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(args.out / "noise_spectra.png", dpi=110)
    print(f"written: {args.out / 'noise_spectra.json'}, {args.out / 'noise_spectra.png'}")


if __name__ == "__main__":
    main()
