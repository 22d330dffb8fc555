"""``ldct-node evaluate``: the evaluation report on a held-out set (DESIGN §5).

Every method denoises the same held-out low-dose slices; each output is scored slice by slice
against the normal-dose slice (PSNR and SSIM over [−1024, 3072] HU and over the soft-tissue window
[−160, 240] HU, RMSE in HU). The report gives mean ± sd over slices, paired Wilcoxon signed-rank
p-values of every method against the reference network (slices are paired: the same slice
through every method, and the differences need not be normal), inference seconds per slice, a
Bland–Altman plot of PSNR against the reference, and side-by-side crops at the soft-tissue
display window. Written as report.md, report.html, metrics.json and PNG figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import wilcoxon  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ldct_node.config import InferenceSettings  # noqa: E402
from ldct_node.denoise import DenoiseEngine  # noqa: E402
from ldct_node.errors import CommandError  # noqa: E402

from .bank import VALIDATION_KERNEL, BankSlice, is_bank, load_bank, noise_for  # noqa: E402
from .baselines import BASELINES, BaselineSettings, bm3d_available, denoise_volume  # noqa: E402
from .data import SPLITS, PairSpec, Volume, load_pair, load_pairs, split_pairs  # noqa: E402
from .metrics import HU_FULL, HU_SOFT_TISSUE, METRIC_LABELS, psnr, slice_metrics  # noqa: E402
from .recipe import parse_float_list  # noqa: E402

LOW_DOSE = "Low-dose input"
CITATION_FILE = "Citations.txt"
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


@dataclass
class Method:
    name: str
    kind: str
    denoise: Callable[[Volume], np.ndarray]  # (S, H, W) low-dose HU -> (S, H, W) HU
    source: str = ""
    card_data: dict = field(default_factory=dict)  # a network's training data, as its model card states it


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


# ---------------------------------------------------------------- methods


def parse_weights(text: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` or a bare ``PATH`` (named after its model card)."""
    name, sep, path = text.partition("=")
    if not sep:
        return None, Path(text)
    if not name.strip() or not path:
        raise CommandError(f"--weights {text!r}: write NAME=PATH, e.g. 'TSC-Net D=runs/d/best.safetensors'")
    return name.strip(), Path(path)


def network_method(name: str | None, path: Path | None, inference: InferenceSettings) -> Method:
    engine = DenoiseEngine.from_path(path, inference)
    label = name or engine.card.model_id

    def denoise(low: Volume) -> np.ndarray:
        return engine.denoise_hu(low.hu, keep=low.hu <= inference.outside_fov_below_hu)

    return Method(label, "network", denoise, source=f"{engine.card.model_id} ({path or 'shipped weights'})",
                  card_data=dict(engine.card.data))


def baseline_methods(settings: BaselineSettings) -> list[Method]:
    methods = [Method(LOW_DOSE, "input", lambda low: low.hu)]
    for name, function in BASELINES.items():
        methods.append(Method(name, "baseline", lambda low, f=function: denoise_volume(f, low.hu, settings)))
    return methods


def unavailable_methods() -> list[tuple[str, str]]:
    return [] if bm3d_available() else [("BM3D", "not available: the bm3d package is not installed")]


# ---------------------------------------------------------------- running


@dataclass
class HeldOut:
    pairs: list[tuple[PairSpec, Volume, Volume]]

    @property
    def slices(self) -> int:
        return sum(low.hu.shape[0] for _, low, _ in self.pairs)

    def crop_slice(self) -> tuple[int, int]:
        """(pair index, slice index) of the middle slice of the whole set."""
        middle = self.slices // 2
        for i, (_, low, _) in enumerate(self.pairs):
            if middle < low.hu.shape[0]:
                return i, middle
            middle -= low.hu.shape[0]
        raise ValueError("empty held-out set")  # pragma: no cover - load_held_out refuses it


def load_held_out(pairs_path: Path, split: str, val_fraction: float, test_fraction: float, seed: int) -> HeldOut:
    cache: dict = {}  # volumes split_pairs read to cut slabs, reused below
    specs, cuts = split_pairs(load_pairs(pairs_path), val_fraction, test_fraction, seed, cache)
    for cut in cuts:
        print(cut.line())
    chosen = [spec for spec in specs if spec.split == split]
    if not chosen:
        raise CommandError(f"pairs file {pairs_path} has no '{split}' pairs: mark some with split = \"{split}\" or choose another --split")
    return HeldOut([(spec, *load_pair(spec, cache)) for spec in chosen])


def held_out_from_bank(folder: Path, slices: list[BankSlice], split: str, dose: float, seed: int) -> HeldOut:
    """The bank's slices of one split with one seeded low-dose draw each at ``dose`` (the
    validation kernel), each slice a pair of its own."""
    pairs = []
    for i, item in enumerate(slices):
        window = (slice(0, item.hu.shape[0]), slice(0, item.hu.shape[1]))
        low = item.hu + noise_for(item, window, dose, VALIDATION_KERNEL, np.random.default_rng((seed, i)))
        spacing = (1.0, item.pixel_mm, item.pixel_mm)
        spec = PairSpec(patient=item.record["patient"], low=folder / item.record["file"], normal=Path(item.record["source_file"]), split=split)
        pairs.append((spec, Volume(low[None].astype(np.float32), spacing, np.zeros(1)), Volume(item.hu[None], spacing, np.zeros(1))))
    return HeldOut(pairs)


def run_method(method: Method, held_out: HeldOut) -> MethodResult:
    result = MethodResult(method.name, method.kind, source=method.source)
    crop_pair, crop_index = held_out.crop_slice()
    for i, (_, low, normal) in enumerate(tqdm(held_out.pairs, desc=method.name, unit="volume", leave=False)):
        started = time.perf_counter()
        output = method.denoise(low)
        result.seconds += time.perf_counter() - started
        result.slices += low.hu.shape[0]
        for out_slice, ref_slice in zip(output, normal.hu):
            for metric, value in slice_metrics(out_slice, ref_slice).items():
                result.per_slice[metric].append(value)
        if i == crop_pair:
            result.crop = np.asarray(output[crop_index], dtype=np.float32)
    return result


def p_values(results: list[MethodResult], reference: str) -> dict[str, dict[str, float | None]]:
    ref = next(r for r in results if r.name == reference)
    return {r.name: {m: (None if r.name == reference else paired_p_value(r.per_slice[m], ref.per_slice[m]))
                     for m in METRIC_LABELS} for r in results}


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


def find_citation(paths: list[Path]) -> str | None:
    """Citations.txt in a data folder or any folder above it (where the shared series keeps it)."""
    for path in paths:
        for folder in [path.resolve(), *path.resolve().parents]:
            candidate = folder / CITATION_FILE
            if candidate.is_file():
                return candidate.read_text().strip()
    return None


def dataset_citation(held_out: HeldOut, networks: list[Method]) -> str:
    """The data's own Citations.txt, else the citation a model card gives for its data."""
    found = find_citation([spec.normal for spec, _, _ in held_out.pairs])
    if found:
        return found
    for network in networks:
        if network.card_data.get("citation"):
            return str(network.card_data["citation"])
    return "not stated (no Citations.txt beside the data, no citation in the model cards)"


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


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                        help="a network to evaluate (repeatable), e.g. 'TSC-Net D=runs/d/best.safetensors'; "
                             "default: the shipped TSC-Net student. The first is the reference for p-values")
    parser.add_argument("--data", type=Path, required=True, help="pairs file (TOML) naming low-/normal-dose volumes, "
                        "or a noise bank folder (then --dose)")
    parser.add_argument("--dose", type=parse_float_list, help="with a noise bank: the dose fraction(s) simulated for every held-out "
                        "slice, e.g. 0.25 or 0.1,0.25,0.5 (several: one report per dose and a summary.md)")
    parser.add_argument("--report", type=Path, default=Path("report"), help="output folder (default: report/)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="which split to evaluate (default: test)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="as in the training run, for pairs without a split")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="as in the training run, for pairs without a split")
    parser.add_argument("--split-seed", type=int, default=0, help="the training run's --seed, for pairs without a split")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N for the networks")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per forward pass")


def dose_folder(report: Path, dose: float, several: bool) -> Path:
    """One report folder per simulated dose when there are several (report/dose-25 for 25 %)."""
    return report / f"dose-{dose * 100:g}" if several else report


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


def pooled_comparison(reports: dict[float, Report], metric: str = "psnr_soft") -> dict[str, dict]:
    """Per method: its per-case differences to the reference over every slice of every dose, and the
    Wilcoxon p of those pairs."""
    reference = next(iter(reports.values())).reference
    pooled: dict[str, dict] = {}
    for report in reports.values():
        ref = next(r for r in report.results if r.name == reference).per_slice[metric]
        for result in report.results:
            if result.name != reference:
                entry = pooled.setdefault(result.name, {"values": [], "reference": []})
                entry["values"] += result.per_slice[metric]
                entry["reference"] += ref
    return {name: {"difference": [a - b for a, b in zip(e["values"], e["reference"])], "p": paired_p_value(e["values"], e["reference"])}
            for name, e in pooled.items()}


def held_out_sets(args: argparse.Namespace) -> dict[float | None, HeldOut]:
    """The held-out set per dose (a noise bank, one simulated draw per dose), or the pairs file's one set."""
    if not is_bank(args.data):
        if args.dose:
            raise CommandError("--dose applies to a noise bank only: a pairs file brings its own low-dose scans")
        return {None: load_held_out(args.data, args.split, args.val_fraction, args.test_fraction, args.split_seed)}
    if not args.dose or not all(0 < d < 1 for d in args.dose):
        raise CommandError("a noise bank needs --dose, fractions in (0, 1) such as 0.25 or 0.1,0.25,0.5")
    slices = load_bank(args.data, args.split)  # read once, whatever the number of doses
    if not slices:
        raise CommandError(f"noise bank {args.data} has no '{args.split}' slices: choose another --split")
    return {dose: held_out_from_bank(args.data, slices, args.split, dose, args.split_seed) for dose in args.dose}


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("device", args.device), ("batch_size", args.batch_size)) if v is not None}
    inference = dataclasses.replace(InferenceSettings(), **overrides)
    specs = [parse_weights(text) for text in args.weights] or [(None, None)]
    held_out_by_dose = held_out_sets(args)
    networks = [network_method(name, path, inference) for name, path in specs]
    names = [m.name for m in networks]
    if len(set(names)) < len(names) or set(names) & {LOW_DOSE, *BASELINES}:
        raise CommandError(f"method names must be unique and differ from {LOW_DOSE}, {', '.join(BASELINES)}: got {', '.join(names)}")
    baseline_settings = BaselineSettings()
    methods = baseline_methods(baseline_settings) + networks
    reference = networks[0].name
    several = len(held_out_by_dose) > 1
    reports = {}
    for dose, held_out in held_out_by_dose.items():
        results = [run_method(method, held_out) for method in methods]
        report = Report(results, reference, p_values(results, reference), held_out, args.split, args.data,
                        dataset_citation(held_out, networks), unavailable_methods(), EvaluationSettings(), baseline_settings)
        written = write_report(report, dose_folder(args.report, dose, several) if dose is not None else args.report)
        if dose is not None:
            print(f"{dose * 100:g} % dose:")
        for line in report.markdown().splitlines():
            if line.startswith("|"):
                print(line)
        print(f"report written: {', '.join(str(p) for p in written)}")
        reports[dose] = report
    if several:
        summary = args.report / "summary.md"
        pooled = pooled_comparison(reports)
        summary.write_text(summary_markdown(reports, pooled))
        (args.report / "summary.json").write_text(json.dumps(
            {"doses": {f"{dose:g}": report.json() for dose, report in reports.items()},
             "pooled_psnr_soft": pooled}, indent=1) + "\n")
        print(f"summary written: {summary}")
    return 0
