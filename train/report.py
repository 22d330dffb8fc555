"""The evaluation report's rendering: tables (report.md, report.html, summary.md), the numbers behind
them (metrics.json, summary.json) and the figures (a Bland–Altman plot of PSNR, side-by-side crops).
`ldct-node evaluate` (train/evaluate.py) runs the methods and hands their results here."""

from __future__ import annotations

import dataclasses
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import wilcoxon  # noqa: E402

from .baselines import BaselineSettings  # noqa: E402
from .metrics import HU_FULL, HU_SOFT_TISSUE, METRIC_LABELS, psnr  # noqa: E402

if TYPE_CHECKING:
    from .evaluate import HeldOut

P_VALUE_TEST = "Wilcoxon signed-rank test, two-sided, paired by slice"
# Decimals shown per metric: PSNR to 0.01 dB, SSIM to 1e-4, RMSE to 0.1 HU.
METRIC_DIGITS = {"psnr_full": 2, "ssim_full": 4, "psnr_soft": 2, "ssim_soft": 4, "rmse_hu": 1, "hu_bias": 2, "noise_sd": 1}
FIGURES = {"bland_altman": "bland_altman_psnr.png", "crops": "crops.png"}


@dataclass(frozen=True)
class EvaluationSettings:
    display_centre_hu: float = 40.0
    display_width_hu: float = 400.0
    crop_size: int = 192
    # Pixels above this are body: the crop is centred on the body, not on the table or air.
    body_above_hu: float = -500.0
    figure_dpi: int = 120


@dataclass
class MethodResult:
    name: str
    kind: str  # "input", "baseline" or "network"
    per_slice: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in METRIC_LABELS})
    seconds: float = 0.0
    slices: int = 0
    crop: np.ndarray | None = None  # the method's output at the crop slice
    source: str = ""

    @property
    def seconds_per_slice(self) -> float:
        return self.seconds / self.slices if self.slices else 0.0


# ---------------------------------------------------------------- statistics


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample SD (0 for a single slice)."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]  # slices without soft tissue have no HU bias or noise σ
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def paired_p_value(values: list[float], reference: list[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p of the slice-wise differences; None where no test is
    possible (identical values, or fewer than two finite pairs)."""
    a, b = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    difference = a[finite] - b[finite]
    if difference.size < 2 or not np.any(difference != 0):
        return None
    return float(wilcoxon(a[finite], b[finite], alternative="two-sided").pvalue)


def format_p(p: float | None) -> str:
    if p is None:
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def format_mean_sd(values: list[float], metric: str) -> str:
    mean, sd = mean_sd(values)
    digits = METRIC_DIGITS[metric]
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


# ---------------------------------------------------------------- images


def display_window(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    """HU mapped to [0, 1] grey levels for a display window (centre, width)."""
    low = centre - width / 2
    return np.clip((np.asarray(hu, dtype=np.float64) - low) / width, 0.0, 1.0)


def crop_box(reference_hu: np.ndarray, size: int, body_above_hu: float) -> tuple[slice, slice]:
    """A square of at most `size` pixels centred on the body's centre of mass, inside the image."""
    height, width = reference_hu.shape
    size = min(size, height, width)
    body = np.argwhere(reference_hu > body_above_hu)
    centre = body.mean(axis=0) if len(body) else np.array([height / 2, width / 2])
    top = int(np.clip(round(centre[0] - size / 2), 0, height - size))
    left = int(np.clip(round(centre[1] - size / 2), 0, width - size))
    return slice(top, top + size), slice(left, left + size)


# ---------------------------------------------------------------- figures


def bland_altman_figure(results: list[MethodResult], reference: str, path: Path, dpi: int) -> None:
    """PSNR of each method against the reference: difference over mean, with bias and ±1.96 SD."""
    ref = next(r for r in results if r.name == reference)
    others = [r for r in results if r.name != reference]
    rows = (("psnr_full", HU_FULL), ("psnr_soft", HU_SOFT_TISSUE))
    fig, axes = plt.subplots(len(rows), max(len(others), 1), figsize=(4 * max(len(others), 1), 3.6 * len(rows)), squeeze=False)
    for row, (metric, hu_range) in enumerate(rows):
        for col, other in enumerate(others):
            ax = axes[row][col]
            a, b = np.asarray(other.per_slice[metric]), np.asarray(ref.per_slice[metric])
            finite = np.isfinite(a) & np.isfinite(b)
            mean, diff = (a[finite] + b[finite]) / 2, a[finite] - b[finite]
            ax.scatter(mean, diff, s=8, alpha=0.7)
            if diff.size:
                bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if diff.size > 1 else 0.0
                ax.axhline(bias, color="k", lw=1, label=f"bias {bias:+.2f} dB")
                for limit in (bias - 1.96 * sd, bias + 1.96 * sd):
                    ax.axhline(limit, color="k", lw=0.8, ls="--")
                ax.legend(fontsize=7, loc="best")
            ax.set_title(f"{other.name} − {reference}", fontsize=9)
            ax.set_xlabel(f"mean PSNR [dB], HU {hu_range[0]:g}..{hu_range[1]:g}", fontsize=8)
            ax.set_ylabel("difference [dB]", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def crops_figure(reference_hu: np.ndarray, results: list[MethodResult], settings: EvaluationSettings, path: Path) -> None:
    """Normal-dose reference and every method's output at one slice, cropped, soft-tissue window."""
    rows, cols = crop_box(reference_hu, settings.crop_size, settings.body_above_hu)
    panels = [("Normal dose (reference)", reference_hu)] + [(r.name, r.crop) for r in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.4), squeeze=False)
    for ax, (title, image) in zip(axes[0], panels):
        ax.imshow(display_window(image[rows, cols], settings.display_centre_hu, settings.display_width_hu), cmap="gray", vmin=0, vmax=1)
        if image is not reference_hu:
            title += f"\nPSNR {psnr(image, reference_hu, HU_SOFT_TISSUE):.2f} dB (soft tissue)"
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"window centre {settings.display_centre_hu:g} HU, width {settings.display_width_hu:g} HU", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))  # leave the top tenth to the suptitle
    fig.savefig(path, dpi=settings.figure_dpi)
    plt.close(fig)


# ---------------------------------------------------------------- report


@dataclass
class Report:
    results: list[MethodResult]
    reference: str
    p: dict[str, dict[str, float | None]]
    held_out: HeldOut
    split: str
    pairs_file: Path
    citation: str
    unavailable: list[tuple[str, str]]
    settings: EvaluationSettings
    baseline_settings: BaselineSettings

    def dataset_lines(self) -> list[str]:
        lines = []
        for spec, low, _ in self.held_out.pairs:
            slab = f" slices [{spec.slices[0]}, {spec.slices[1]})" if spec.slices else ""
            lines.append(f"{spec.patient}{slab}: {low.hu.shape[0]} slices of {low.hu.shape[1]}×{low.hu.shape[2]}, "
                         f"low = {spec.low}, normal = {spec.normal}")
        return lines

    def summary_rows(self) -> list[list[str]]:
        return [[r.name] + [format_mean_sd(r.per_slice[m], m) for m in METRIC_LABELS] + [f"{r.seconds_per_slice:.3f}"]
                for r in self.results]

    def p_rows(self) -> list[list[str]]:
        return [[r.name] + [("reference" if r.name == self.reference else format_p(self.p[r.name][m])) for m in METRIC_LABELS]
                for r in self.results if r.name != self.reference]

    def notes(self) -> list[str]:
        b = self.baseline_settings
        return [
            f"HU ranges: PSNR and SSIM over [{HU_FULL[0]:g}, {HU_FULL[1]:g}] HU (the network's input scaling) and over the "
            f"soft-tissue window [{HU_SOFT_TISSUE[0]:g}, {HU_SOFT_TISSUE[1]:g}] HU, images clipped to the range and the range "
            "width taken as the peak; SSIM with a Gaussian window (σ 1.5); RMSE in HU on the unclipped images.",
            f"Mean ± sample SD over {self.held_out.slices} held-out slices ('{self.split}' split of {self.pairs_file}).",
            f"p-values: {P_VALUE_TEST}, each method against {self.reference}.",
            "Seconds per slice: wall time of the method over the whole set divided by its slices (networks on their "
            "configured device, TV and NLM on the CPU), weights loading excluded.",
            f"TV: Chambolle, weight {b.tv_weight_per_sigma:g} × estimated noise SD; NLM: fast mode, patch {b.nlm_patch_size}, "
            f"distance {b.nlm_patch_distance}, h {b.nlm_h_per_sigma:g} × estimated noise SD (both on the [{HU_FULL[0]:g}, "
            f"{HU_FULL[1]:g}] HU scaling).",
        ] + [f"{name}: {why}." for name, why in self.unavailable]

    def header(self) -> list[str]:
        return ["Method"] + list(METRIC_LABELS.values()) + ["s / slice"]

    def markdown(self) -> str:
        def table(head: list[str], rows: list[list[str]]) -> list[str]:
            return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]

        lines = ["# Evaluation report", "", "## Data", ""]
        lines += [f"- {line}" for line in self.dataset_lines()]
        lines += ["", "Citation:", "", "```", self.citation, "```", "", "## Results", ""]
        lines += table(self.header(), self.summary_rows())
        lines += ["", f"### Paired p-values against {self.reference}", ""]
        lines += table(["Method"] + list(METRIC_LABELS.values()), self.p_rows())
        lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes()]
        lines += ["", "## Figures", "", f"![Bland–Altman plot of PSNR]({FIGURES['bland_altman']})", "",
                  f"![Crops at window centre {self.settings.display_centre_hu:g} HU, width {self.settings.display_width_hu:g} HU]({FIGURES['crops']})", ""]
        return "\n".join(lines)

    def html(self) -> str:
        def table(head: list[str], rows: list[list[str]]) -> str:
            cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"

        items = lambda lines: "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>"  # noqa: E731
        return "\n".join([
            "<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\"><title>Evaluation report</title>",
            "<style>body{font-family:sans-serif;max-width:70em;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #999;padding:0.2em 0.5em;text-align:right}td:first-child,th:first-child{text-align:left}"
            "pre{white-space:pre-wrap}</style></head><body>",
            "<h1>Evaluation report</h1>", "<h2>Data</h2>", items(self.dataset_lines()),
            f"<p>Citation:</p><pre>{html.escape(self.citation)}</pre>",
            "<h2>Results</h2>", table(self.header(), self.summary_rows()),
            f"<h3>Paired p-values against {html.escape(self.reference)}</h3>",
            table(["Method"] + list(METRIC_LABELS.values()), self.p_rows()),
            "<h2>Notes</h2>", items(self.notes()),
            "<h2>Figures</h2>",
            f"<p><img src=\"{FIGURES['bland_altman']}\" alt=\"Bland–Altman plot of PSNR\"></p>",
            f"<p><img src=\"{FIGURES['crops']}\" alt=\"crops\"></p>",
            "</body></html>",
        ])

    def json(self) -> dict:
        return {
            "split": self.split,
            "pairs_file": str(self.pairs_file),
            "slices": self.held_out.slices,
            "data": self.dataset_lines(),
            "citation": self.citation,
            "hu_ranges": {"full": list(HU_FULL), "soft_tissue": list(HU_SOFT_TISSUE)},
            "metrics": METRIC_LABELS,
            "reference": self.reference,
            "p_value_test": P_VALUE_TEST,
            "methods": {
                r.name: {
                    "kind": r.kind,
                    "source": r.source,
                    "seconds_per_slice": r.seconds_per_slice,
                    "mean": {m: mean_sd(v)[0] for m, v in r.per_slice.items()},
                    "sd": {m: mean_sd(v)[1] for m, v in r.per_slice.items()},
                    "p_value": self.p[r.name],
                    "per_slice": r.per_slice,
                }
                for r in self.results
            },
            "not_available": dict(self.unavailable),
            "settings": {"evaluation": dataclasses.asdict(self.settings), "baselines": dataclasses.asdict(self.baseline_settings)},
        }


def write_report(report: Report, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    pair, index = report.held_out.crop_slice()
    reference_hu = report.held_out.pairs[pair][2].hu[index]
    bland_altman_figure(report.results, report.reference, folder / FIGURES["bland_altman"], report.settings.figure_dpi)
    crops_figure(reference_hu, report.results, report.settings, folder / FIGURES["crops"])
    texts = {"report.md": report.markdown(), "report.html": report.html(),
             "metrics.json": json.dumps(report.json(), indent=2) + "\n"}
    for name, text in texts.items():
        (folder / name).write_text(text)
    return [folder / name for name in (*texts, *FIGURES.values())]


def summary_markdown(reports: dict[float, Report], pooled: dict[str, dict]) -> str:
    """The results tables of several doses on one page, each with its p-values against the reference."""
    lines = ["# Evaluation summary over simulated doses", ""]
    for dose, report in reports.items():
        rows = [row + [("reference" if row[0] == report.reference else format_p(report.p[row[0]]["psnr_soft"]))]
                for row in report.summary_rows()]
        head = report.header() + [f"p (PSNR soft) vs {report.reference}"]
        lines += [f"## {dose * 100:g} % dose ({report.held_out.slices} slices; details in dose-{dose * 100:g}/report.md)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows] + [""]
    reference = next(iter(reports.values())).reference
    cases = len(next(iter(pooled.values()))["difference"]) if pooled else 0
    lines += [f"## All doses pooled: each method against {reference} ({cases} slice × dose cases)", "",
              "With few held-out slices a per-dose test cannot reach small p-values (4 pairs: p ≥ 0.125); pooled over "
              "doses the same slice enters once per dose, so these cases are not independent anatomy.", "",
              "| Method | mean PSNR soft − reference [dB] | cases where reference is better | p |", "|---|---|---|---|"]
    for name, entry in pooled.items():
        difference = np.asarray(entry["difference"])
        lines.append(f"| {name} | {difference.mean():+.2f} | {int((difference < 0).sum())} of {difference.size} | {format_p(entry['p'])} |")
    lines += ["", "Notes of every table: see any per-dose report.md.", ""]
    return "\n".join(lines)


def write_summary(reports: dict[float, Report], pooled: dict[str, dict], folder: Path) -> Path:
    """summary.md and summary.json over several doses into folder; the path of summary.md."""
    summary = folder / "summary.md"
    summary.write_text(summary_markdown(reports, pooled))
    (folder / "summary.json").write_text(json.dumps(
        {"doses": {f"{dose:g}": report.json() for dose, report in reports.items()},
         "pooled_psnr_soft": pooled}, indent=1) + "\n")
    return summary
