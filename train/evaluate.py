"""``ldct-node evaluate``: the evaluation report on a held-out set.

Every method denoises the same held-out low-dose slices; each output is scored slice by slice
against the normal-dose slice (PSNR and SSIM over [−1024, 3072] HU and over the soft-tissue window
[−160, 240] HU, RMSE in HU). The report gives mean ± sd over slices, paired Wilcoxon signed-rank
p-values of every method against the reference network (slices are paired: the same slice
through every method, and the differences need not be normal), inference seconds per slice, a
Bland–Altman plot of PSNR against the reference, and side-by-side crops at the soft-tissue
display window. Written as report.md, report.html, metrics.json and PNG figures (train/report.py
renders them).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ldct_node.config import InferenceSettings
from ldct_node.errors import CommandError
from ldct_node.net.inference import DenoiseEngine

from .bank import VALIDATION_KERNEL, BankSlice, is_bank, load_bank, noise_for
from .baselines import BASELINES, BaselineSettings, bm3d_available, denoise_volume
from .data import SPLITS, PairSpec, Volume, load_pair, load_pairs, split_pairs
from .metrics import METRIC_LABELS, slice_metrics
from .recipe import parse_float_list
from .report import EvaluationSettings, MethodResult, Report, paired_p_value, write_report, write_summary

LOW_DOSE = "Low-dose input"
CITATION_FILE = "Citations.txt"


# ---------------------------------------------------------------- methods


@dataclass
class Method:
    name: str
    kind: str
    denoise: Callable[[Volume], np.ndarray]  # (S, H, W) low-dose HU -> (S, H, W) HU
    source: str = ""
    card_data: dict = field(default_factory=dict)  # a network's training data, as its model card states it


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


# ---------------------------------------------------------------- citation


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
        summary = write_summary(reports, pooled_comparison(reports), args.report)
        print(f"summary written: {summary}")
    return 0
