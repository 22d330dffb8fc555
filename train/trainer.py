"""`ldct-node train`: two-stage teacher–student training of TSC-Net, and the RED-CNN baseline.

    ldct-node train teacher --data pairs.toml --out runs/t                    # stage 1: NDCT → NDCT
    ldct-node train student --teacher runs/t/best.safetensors --data pairs.toml --out runs/s
    ldct-node train student --variant B --data pairs.toml --out runs/b        # ablation A/B/C/D
    ldct-node train redcnn --data pairs.toml --out runs/red                   # baseline, same data and loop
    ldct-node train student --data BANK ...                                   # noise bank: fresh low dose every step
    torchrun --nproc_per_node 4 -m ldct_node.cli train student ...            # DDP, one process per GPU
    torchrun --nnodes 2 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29500 --nproc_per_node 4 -m ldct_node.cli train ...

OUT receives ``last.safetensors`` (+ card) and ``last.state.pt`` after every epoch, ``best.safetensors``
(+ card) whenever the validation PSNR over [−1024, 3072] HU improves, ``metrics.csv`` and TensorBoard
events under ``tensorboard/``. ``--resume`` continues from ``last.state.pt``. With several processes
only rank 0 writes; for multi-node runs OUT must be on a filesystem every node sees (resume reads it),
and ``--batch-size`` is per process. Training and validation volumes are held in memory.

Each of those files is replaced whole (``ldct_node.durable``: temporary file, fsync, rename), so a run
killed mid-write leaves the previous epoch's file, never a torn one; only the TensorBoard events file
is appended to. What a run is (stage, variant, settings, schedule, losses) is train/recipe.py; the
processes and devices it runs on, train/distributed.py.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tensorboardX import SummaryWriter
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from ldct_node import __version__
from ldct_node.durable import atomic_write, atomic_write_text
from ldct_node.errors import CommandError
from ldct_node.logs import configure_logging, get_logger
from ldct_node.net.allocator import keep_freed_memory
from ldct_node.net.inference import fast_memory_format
from ldct_node.net.model import build_model
from ldct_node.net.weights import InputScaling, ModelCard, load_weights, save_weights

from .bank import DOSE_RANGE, BankSlices, describe_bank, is_bank, load_bank
from .data import PairedSlices, load_pairs, load_scaled_pairs, split_pairs
from .distributed import (
    Processes,
    autocast_dtype,
    hardware_description,
    mean_over_processes,
    replica_digests,
    start_processes,
    stop_processes,
    wait_for_all,
)
from .losses import LossInputs, LossWeights, total_loss
from .metrics import HU_FULL, psnr
from .recipe import (
    DEFAULT_VARIANT,
    STAGES,
    VARIANTS,
    DataOptions,
    Recipe,
    build_recipe,
    check_teacher_fits,
    identity_of,
    lr_at,
    parse_float_list,
    parse_int_list,
)
from .vgg import load_vgg

log = get_logger("ldct_train.trainer")

CARD_NAMES = {"teacher": "tscnet-teacher", "student": "tscnet-student", "redcnn": "redcnn"}
STATE_FORMAT = "ldct-train-state/1"


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=STAGES, help="teacher (stage 1, NDCT→NDCT), student (stage 2) or the redcnn baseline")
    parser.add_argument("--data", type=Path, required=True, help="pairs file (TOML) naming low-/normal-dose volumes, or a noise "
                        "bank folder (`ldct-node prepare`) from which every step draws fresh simulated low dose")
    parser.add_argument("--out", type=Path, required=True, help="run folder for checkpoints, best weights and metrics")
    parser.add_argument("--teacher", type=Path, help="frozen teacher weights for knowledge transfer (student variants C, D)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=f"student ablation variant (default {DEFAULT_VARIANT}): "
                        "A baseline, B +DEM, C +knowledge transfer, D +contrastive regularisation")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from last.state.pt")
    parser.add_argument("--init", type=Path, help="start from these weights (same architecture and settings) instead of "
                        "random ones, e.g. to fine-tune the shipped student on local data")
    schedule = parser.add_argument_group("schedule (defaults: the paper's for the stage)")
    schedule.add_argument("--epochs", type=int, help="teacher 10, student and redcnn 35")
    schedule.add_argument("--batch-size", type=int, help="per process: teacher 4, student and redcnn 2")
    schedule.add_argument("--lr", type=float, help="Adam learning rate, 1e-4")
    schedule.add_argument("--milestones", type=parse_int_list, help="comma-separated epochs after which the lr is multiplied by --lr-gamma")
    schedule.add_argument("--lr-gamma", type=float, help="0.5 (halving); milestones: teacher 2,4, student and redcnn 10,20")
    data = parser.add_argument_group("data")
    data.add_argument("--patch-size", type=int, help="train on random square patches of this size (default: full slices)")
    data.add_argument("--patches-per-epoch", type=int, help="patches drawn per epoch (default: one per training slice)")
    data.add_argument("--no-augment", action="store_true", help="switch off rotations by 90/180/270 and horizontal flips")
    data.add_argument("--dose-range", type=parse_float_list, default=DOSE_RANGE,
                      help="with a noise bank: lowest,highest dose fraction drawn per sample (default 0.05,0.5)")
    data.add_argument("--clean-fraction", type=float, default=DataOptions.clean_fraction,
                      help="with a noise bank: share of samples left at normal dose, to be returned unchanged (default %(default)g)")
    data.add_argument("--val-every", type=int, default=1, help="validate every N epochs (0: never; then no best.safetensors)")
    data.add_argument("--val-fraction", type=float, default=DataOptions.val_fraction, help="share of patients without a split that go to validation")
    data.add_argument("--test-fraction", type=float, default=DataOptions.test_fraction, help="share of patients without a split held out for testing")
    data.add_argument("--split-seed", type=int, default=DataOptions.split_seed,
                      help="seed of the patient split for pairs without one; keep it equal to evaluate's")
    data.add_argument("--workers", type=int, default=DataOptions.workers, help="data loader worker processes")
    arch = parser.add_argument_group("architecture (default: the teacher's for a student, else the model's defaults)")
    arch.add_argument("--in-slices", type=int, help="slices fed to the network (odd; 3 adds both neighbours)")
    arch.add_argument("--width", type=int, help="channels at full resolution")
    arch.add_argument("--num-dems", type=int, help="dynamic enhancement modules (TSC-Net)")
    arch.add_argument("--highpass-sigma", type=float, help="Gaussian σ in pixels of the low-pass taken out of TSC-Net's "
                      "correction (0: off), so that the network cannot shift mean HU or add shading")
    arch.add_argument("--attention-window", type=int, help="DEM channel attention pools over this many bottleneck pixels "
                      "(odd; 0: global); a quarter of the training patch side keeps training and full slices alike")
    loss = parser.add_argument_group("loss weights")
    defaults = LossWeights()
    loss.add_argument("--w-pixel", type=float, default=defaults.pixel, help="smooth L1")
    loss.add_argument("--smooth-l1-beta", type=float, default=defaults.smooth_l1_beta,
                      help="smooth L1's quadratic-to-linear point in network units (HU / 4096); torch's default 1 "
                      "makes it a squared error far below every other term")
    loss.add_argument("--noise-weighted", type=float, default=0.0, metavar="HU",
                      help="divide each sample's pixel loss by the noise power its input carries, floored at this SD in HU "
                      "(about a normal-dose scan's own noise, e.g. 10), so light noise counts as much as heavy (0: off)")
    loss.add_argument("--w-msssim", type=float, default=defaults.msssim, help="1 − MS-SSIM")
    loss.add_argument("--w-kt", type=float, default=defaults.kt, help="knowledge transfer L1")
    loss.add_argument("--w-contrast", type=float, default=defaults.contrast, help="contrastive regularisation")
    loss.add_argument("--contrast-floor", type=float, default=defaults.contrast_floor,
                      help="floor of the contrastive ratio's denominator, as a fraction of the LD-ND feature distance")
    loss.add_argument("--betas", type=parse_float_list, default=defaults.betas, help="contrastive layer weights for conv1_2,conv2_2,conv3_3")
    loss.add_argument("--vgg-weights", type=Path, help="VGG-16 conv1–3 safetensors (default: search $LDCT_NODE_VGG_WEIGHTS, weights/, the cache)")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="seeds weights, data order, patches and augmentation")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda")
    run.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    run.add_argument("--version-tag", default="0.1.0", help="version written into the model card")
    run.add_argument("--card-data", type=Path, help="JSON object merged into the model card's data section "
                     "(dose fraction, simulation settings, dataset citation ...)")
    run.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


# ---------------------------------------------------------------- data


def describe_pair(spec, base: Path) -> dict:
    def rel(p: Path) -> str:
        return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)

    return {"patient": spec.patient, "low": rel(spec.low), "normal": rel(spec.normal),
            "slices": list(spec.slices) if spec.slices else None}


def load_split_data(pairs_path: Path, options: DataOptions, scaling: InputScaling) -> tuple[dict, dict]:
    """Training and validation pairs in network units, and the data description for the card."""
    cache: dict = {}  # volumes split_pairs read to cut slabs, reused below
    specs, cuts = split_pairs(load_pairs(pairs_path), options.val_fraction, options.test_fraction, options.split_seed, cache)
    for cut in cuts:
        log.info("single patient cut into slabs", **cut.fields())
    by_split = {name: [s for s in specs if s.split == name] for name in ("train", "val", "test")}
    if not by_split["train"]:
        raise CommandError(f"pairs file {pairs_path} leaves no training pairs: mark some split = \"train\" or lower --val-fraction/--test-fraction")
    scaled = load_scaled_pairs(by_split["train"] + by_split["val"], scaling, cache)  # one pass: slabs share their volume
    loaded = {"train": scaled[: len(by_split["train"])], "val": scaled[len(by_split["train"]) :]}
    description = {
        "pairs_file": str(pairs_path),
        "pairs_file_text": pairs_path.read_text(),
        "splits": {name: [describe_pair(s, pairs_path.parent) for s in group] for name, group in by_split.items()},
        "slices": {name: int(sum(p.low.shape[0] for p in group)) for name, group in loaded.items()},
    }
    if cuts:
        description["automatic_slabs"] = [cut.fields() for cut in cuts]
    return loaded, description


@dataclass(frozen=True)
class TrainingData:
    """What the command hands the trainer: its datasets and what they are (for the model card)."""

    train: Dataset
    val: Dataset | None
    description: dict


def load_datasets(data: Path, recipe: Recipe, validating: bool, scaling: InputScaling) -> TrainingData:
    """The training set, the validation set (None when not validating) and their description, from a
    pairs file or a noise bank."""
    in_slices, options = recipe.settings["in_slices"], recipe.data
    if is_bank(data):
        if in_slices != 1:
            raise CommandError("a noise bank holds single slices: train with --in-slices 1")
        train = BankSlices(load_bank(data, "train"), scaling, options.patch_size, options.patches_per_epoch,
                           augment=options.augment, seed=recipe.seed, dose_range=options.dose_range,
                           clean_fraction=options.clean_fraction)
        val = BankSlices(load_bank(data, "val"), scaling, seed=recipe.seed) if validating else None
        described = describe_bank(data)
        described["slices"] = {"train": len(train.slices), "val": len(val.slices) if val else 0}
    else:
        splits, described = load_split_data(data, options, scaling)
        train = PairedSlices(splits["train"], in_slices, options.patch_size, options.patches_per_epoch,
                             augment=options.augment, seed=recipe.seed)
        val = PairedSlices(splits["val"], in_slices) if splits["val"] and validating else None
    if validating and val is None:
        raise CommandError("no validation pairs: mark a pair (or a slices slab of one patient) split = \"val\", "
                           "raise --val-fraction, or pass --val-every 0 to train without validation")
    return TrainingData(train, val, described)


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class RunFiles:
    """Where a run reads and writes, and what its model cards say beyond the recipe."""

    out: Path
    pairs: Path
    teacher: Path | None = None
    vgg: Path | None = None
    init: Path | None = None
    version_tag: str = "0.1.0"
    val_every: int = 1
    card_data: dict = dataclasses.field(default_factory=dict)


class Trainer:
    def __init__(self, recipe: Recipe, files: RunFiles, procs: Processes, device: torch.device):
        self.recipe, self.files, self.procs, self.device = recipe, files, procs, device
        self.out, self.val_every = files.out, files.val_every
        self.scaling = InputScaling()
        torch.manual_seed(recipe.seed)
        self.memory_format = fast_memory_format(device)
        if device.type == "cpu":
            keep_freed_memory()
        self.model = build_model(recipe.architecture, recipe.settings).to(device, memory_format=self.memory_format)
        if recipe.stage == "teacher":
            # TSC-Net's head starts at zero (identity), which solves NDCT -> NDCT at step 0 with zero
            # gradients; the teacher must start from a correction to cancel so its features learn.
            self.model.head.reset_parameters()
        self.init_info = self._load_init(files.init) if files.init is not None else None
        self.teacher, self.teacher_info = None, None
        if recipe.variant.knowledge_transfer:
            self.teacher, self.teacher_info = self._load_teacher(files.teacher)
        self.vgg = load_vgg(files.vgg, device) if recipe.variant.contrast else None
        self.net = DistributedDataParallel(self.model, device_ids=[device] if device.type == "cuda" else None) if procs.distributed else self.model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=recipe.schedule.lr, betas=recipe.schedule.adam_betas)
        self.amp_dtype = autocast_dtype(device, recipe.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.epoch = 0
        self.best_psnr = -math.inf
        self.history: list[dict] = []
        self.wall_time_s = 0.0

    # -------------------------------------------------------- setup helpers

    def _load_teacher(self, path: Path | None) -> tuple[nn.Module, dict]:
        if path is None:
            raise CommandError(f"student variant {self.recipe.variant_name} uses knowledge transfer and needs --teacher "
                               "runs/t/best.safetensors (train one with `ldct-node train teacher`), or use --variant A or B")
        loaded = load_weights(path, self.device)
        if loaded.card.architecture != "tscnet":
            raise CommandError(f"--teacher {path} is a {loaded.card.architecture} network: pass a TSC-Net teacher")
        check_teacher_fits(self.recipe.settings, loaded.card.settings)
        loaded.model.requires_grad_(False)
        teacher = loaded.model.to(memory_format=self.memory_format).eval()
        return teacher, {"path": str(loaded.path), "model": loaded.card.model_id, "sha256": loaded.card.sha256}

    def _load_init(self, path: Path) -> dict:
        """Copies the weights at ``path`` into the model; they must be of the recipe's architecture."""
        loaded = load_weights(path, self.device)
        if (loaded.card.architecture, loaded.card.settings) != (self.recipe.architecture, self.recipe.settings):
            raise CommandError(f"--init {path} is {loaded.card.architecture} {loaded.card.settings}, not the "
                               f"{self.recipe.architecture} {self.recipe.settings} this run trains: pass matching --width, "
                               "--num-dems, --in-slices, --highpass-sigma and --attention-window")
        self.model.load_state_dict(loaded.model.state_dict())
        return {"path": str(loaded.path), "model": loaded.card.model_id, "sha256": loaded.card.sha256}

    # -------------------------------------------------------- resume state

    @property
    def state_path(self) -> Path:
        return self.out / "last.state.pt"

    def resume(self) -> None:
        if not self.state_path.is_file():
            raise CommandError(f"nothing to resume: {self.state_path} does not exist; start without --resume")
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise CommandError(f"{self.state_path} is not a resume state of this trainer: start a new run in another --out")
        saved = identity_of(json.loads(state["recipe"]))
        if saved != identity_of(self.recipe.to_dict()):
            raise CommandError(f"{self.state_path} is a different run ({saved['stage']}, variant {saved['variant']}, "
                               f"{saved['architecture']} {saved['settings']}): resume with the same stage, variant and architecture")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best_psnr = int(state["epoch"]), float(state["best_psnr"])
        self.history, self.wall_time_s = list(state["history"]), float(state["wall_time_s"])
        torch.set_rng_state(state["rng"])

    def _save_state(self) -> None:
        state = {
            "format": STATE_FORMAT, "recipe": json.dumps(self.recipe.to_dict()), "epoch": self.epoch,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "best_psnr": self.best_psnr, "history": self.history, "wall_time_s": self.wall_time_s, "rng": torch.get_rng_state(),
        }
        atomic_write(self.state_path, lambda fh: torch.save(state, fh))

    # -------------------------------------------------------- one step

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(network input, normal stack, low-dose middle slice, normal-dose middle slice)."""
        low = batch["low"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        normal = batch["normal"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        mid = low.shape[1] // 2
        # Stage 1 learns to reproduce the normal-dose image from itself.
        x = normal if self.recipe.stage == "teacher" else low
        return x, normal, low[:, mid : mid + 1], normal[:, mid : mid + 1]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _step(self, batch: dict) -> dict[str, float]:
        x, normal, ld, nd = self._inputs(batch)
        feature_index = self.recipe.settings.get("feature_index", 0)
        with self._autocast():
            rec, features = self.net(x, return_features=True)
            teacher_features = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_features = self.teacher(normal, return_features=True)[1][feature_index]
        wants_ld = self.vgg is not None or self.recipe.loss.noise_floor > 0
        inputs = LossInputs(rec=rec, nd=nd, ld=ld if wants_ld else None,
                            student_features=features[feature_index] if teacher_features is not None else None,
                            teacher_features=teacher_features)
        # Losses in float32: SSIM's variances (E[x²] − E[x]²) cancel catastrophically in half precision.
        loss, parts = total_loss(self.recipe.loss, inputs, self.vgg)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return parts

    # -------------------------------------------------------- epochs

    def _use(self, data: TrainingData) -> None:
        self.train_set, self.val_set = data.train, data.val
        # What the trainer measured wins over what the caller describes.
        self.data_description = {**self.files.card_data, **data.description}
        self.sampler = DistributedSampler(data.train, num_replicas=self.procs.world_size, rank=self.procs.rank, shuffle=True,
                                          seed=self.recipe.seed)
        self.loader = DataLoader(data.train, batch_size=self.recipe.schedule.batch_size, sampler=self.sampler,
                                 num_workers=self.recipe.data.workers, pin_memory=self.device.type == "cuda")

    def _train_epoch(self) -> dict[str, float]:
        lr = lr_at(self.recipe.schedule, self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.sampler.set_epoch(self.epoch)
        self.train_set.set_epoch(self.epoch)
        self.net.train()
        sums: dict[str, float] = {}
        steps = 0
        bar = tqdm(self.loader, desc=f"{self.recipe.stage} epoch {self.epoch + 1}/{self.recipe.schedule.epochs}",
                   disable=not self.procs.is_main, dynamic_ncols=True, unit="batch")
        for batch in bar:
            parts = self._step(batch)
            steps += 1
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
            bar.set_postfix(loss=f"{parts['total']:.5f}", lr=f"{lr:.2g}")
        means = {f"train_{k}": v / max(steps, 1) for k, v in sorted(sums.items())}
        return {"lr": lr, **mean_over_processes(means, self.procs, self.device)}

    @torch.no_grad()
    def validate(self) -> float:
        """Mean PSNR over validation slices on [−1024, 3072] HU (full slices, no augmentation)."""
        self.model.eval()
        scores = []
        for i in range(len(self.val_set)):
            item = self.val_set[i]
            x, _, _, nd = self._inputs({k: v[None] for k, v in item.items()})
            with self._autocast():
                rec = self.model(x)
            rec_hu = self.scaling.to_hu(rec.float().cpu().numpy()[0, 0])
            nd_hu = self.scaling.to_hu(nd.float().cpu().numpy()[0, 0])
            scores.append(psnr(rec_hu, nd_hu, HU_FULL))
        return float(np.mean(scores))

    def fit(self, data: TrainingData) -> Path:
        self._use(data)
        schedule = self.recipe.schedule
        writer = self._tensorboard()
        if self.epoch >= schedule.epochs and self.procs.is_main:
            log.info("already trained", epochs=self.epoch, out=str(self.out))
        while self.epoch < schedule.epochs:
            started = time.monotonic()
            row = {"epoch": self.epoch + 1, **self._train_epoch()}
            last_epoch = self.epoch + 1 == schedule.epochs
            if self.procs.is_main and self.val_set is not None and ((self.epoch + 1) % self.val_every == 0 or last_epoch):
                row["val_psnr_db"] = self.validate()
            self.epoch += 1
            self.wall_time_s += time.monotonic() - started
            row["seconds"] = time.monotonic() - started
            self.history.append(row)
            if self.procs.is_main:
                self._checkpoint(row, writer)
            wait_for_all(self.procs)
        replicas = replica_digests(self.model, self.procs)
        if self.procs.is_main:
            self._write_weights("last", {"replica_weights_sha256": replicas})
            writer.close()
        return self.out / "last.safetensors"

    # -------------------------------------------------------- outputs

    def _tensorboard(self):
        if not self.procs.is_main:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        return SummaryWriter(str(self.out / "tensorboard"))

    def _checkpoint(self, row: dict, writer) -> None:
        improved = "val_psnr_db" in row and row["val_psnr_db"] > self.best_psnr
        if improved:
            self.best_psnr = row["val_psnr_db"]
            self._write_weights("best")
        self._write_weights("last")
        self._save_state()
        write_metrics_csv(self.out / "metrics.csv", self.history)
        for key, value in row.items():
            if key != "epoch":
                writer.add_scalar(key, value, row["epoch"])
        writer.flush()
        log.info("epoch done", **{k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}, best=improved)

    def _write_weights(self, stem: str, extra_training: dict | None = None) -> Path:
        metrics = {}
        if self.best_psnr > -math.inf:
            metrics = {"validation": {"psnr_db": self.best_psnr if stem == "best" else self.history[-1].get("val_psnr_db"),
                                      "hu_range": list(HU_FULL), "slices": self.data_description["slices"]["val"],
                                      "epoch": self._best_epoch() if stem == "best" else self.epoch}}
        training = {**self.recipe.to_dict(), "epochs_completed": self.epoch, "teacher": self.teacher_info,
                    "initialised_from": self.init_info,
                    "hardware": hardware_description(self.device, self.procs), "wall_time_s": round(self.wall_time_s, 1),
                    "trainer": f"ldct-node {__version__}", **(extra_training or {})}
        card = ModelCard(name=CARD_NAMES[self.recipe.stage], version=self.files.version_tag, architecture=self.recipe.architecture,
                         settings=self.recipe.settings, input_scaling=self.scaling, training=training, metrics=metrics,
                         data=self.data_description)
        return save_weights(self.model, card, self.out / f"{stem}.safetensors")

    def _best_epoch(self) -> int | None:
        scored = [r for r in self.history if "val_psnr_db" in r]
        return max(scored, key=lambda r: r["val_psnr_db"])["epoch"] if scored else None


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    """One row per epoch; rewritten whole from the run history, so a resumed run has no gaps or repeats."""
    columns = list(dict.fromkeys(key for row in history for key in row))
    text = io.StringIO(newline="")
    out = csv.DictWriter(text, fieldnames=columns)
    out.writeheader()
    out.writerows(history)
    atomic_write_text(path, text.getvalue())


def read_card_data(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        extra = json.loads(path.read_text())
    except FileNotFoundError:
        raise CommandError(f"--card-data {path} not found: check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CommandError(f"--card-data {path} is not valid JSON ({exc}): fix it") from None
    if not isinstance(extra, dict):
        raise CommandError(f"--card-data {path} must hold a JSON object ({{\"key\": value, ...}})")
    return extra


def run(args: argparse.Namespace) -> int:
    procs, device = start_processes(args.device)
    configure_logging(args.log_level if procs.is_main else "warning")
    try:
        recipe = build_recipe(args)
        if args.init is not None and args.resume:
            raise CommandError("--init and --resume exclude each other: a resumed run continues from its own state")
        files = RunFiles(out=args.out, pairs=args.data, teacher=args.teacher, vgg=args.vgg_weights, init=args.init, version_tag=args.version_tag,
                         val_every=args.val_every, card_data=read_card_data(args.card_data))
        if args.stage == "student" and not recipe.variant.knowledge_transfer and args.teacher is not None:
            log.warning("teacher not used", variant=recipe.variant_name, teacher=str(args.teacher))
        if not args.resume and (args.out / "last.state.pt").exists():
            raise CommandError(f"{args.out} already holds a run (last.state.pt): pass --resume to continue it, or choose another --out")
        # Networks first: a missing teacher, --init or VGG file fails before any volume is read.
        trainer = Trainer(recipe, files, procs, device)
        data = load_datasets(files.pairs, recipe, files.val_every > 0, trainer.scaling)
        if args.resume:
            trainer.resume()
        last = trainer.fit(data)
        if procs.is_main:
            best = args.out / "best.safetensors"
            log.info("training finished", last=str(last), best=str(best) if best.exists() else None,
                     best_val_psnr_db=trainer.best_psnr if trainer.best_psnr > -math.inf else None)
    finally:
        stop_processes(procs)
    return 0
