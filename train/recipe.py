"""What defines a training run, and the rules that build it from the command line: the stage, the
ablation variant, the network settings, the schedule, the loss weights and the data options. A
`Recipe` is stored in the resume state and in every model card the run writes.

Everything here is checked before any data is read or any network trained, so an impossible
combination of options is a one-line CommandError.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from ldct_node.errors import CommandError
from ldct_node.net.model import REDCNNConfig, TSCNetConfig, build_model
from ldct_node.net.weights import InputScaling, read_card

from .bank import DOSE_RANGE, KERNEL_ALPHA_RANGE, KERNEL_CUTOFF_RANGE, REPORT_DOSES, VALIDATION_KERNEL
from .losses import LossWeights

STAGES = ("teacher", "student", "redcnn")
ARCHITECTURES = {"teacher": "tscnet", "student": "tscnet", "redcnn": "redcnn"}


@dataclass(frozen=True)
class Schedule:
    """Optimiser and schedule; the defaults are the TSC-Net paper's: Adam(0.9, 0.999) at lr 1e-4, halved after each milestone epoch."""

    epochs: int
    batch_size: int
    milestones: tuple[int, ...]  # epochs after which the learning rate is multiplied by gamma
    lr: float = 1e-4
    gamma: float = 0.5
    adam_betas: tuple[float, float] = (0.9, 0.999)


# RED-CNN gets the student's schedule so the baseline sees exactly the same training budget.
SCHEDULES = {
    "teacher": Schedule(epochs=10, batch_size=4, milestones=(2, 4)),
    "student": Schedule(epochs=35, batch_size=2, milestones=(10, 20)),
    "redcnn": Schedule(epochs=35, batch_size=2, milestones=(10, 20)),
}


@dataclass(frozen=True)
class Variant:
    """One column of the paper's ablation."""

    use_dem: bool
    knowledge_transfer: bool
    contrast: bool


VARIANTS = {
    "A": Variant(use_dem=False, knowledge_transfer=False, contrast=False),  # baseline
    "B": Variant(use_dem=True, knowledge_transfer=False, contrast=False),  # + DEM
    "C": Variant(use_dem=True, knowledge_transfer=True, contrast=False),  # + knowledge transfer
    "D": Variant(use_dem=True, knowledge_transfer=True, contrast=True),  # + contrastive regularisation
}
DEFAULT_VARIANT = "D"
# The teacher and RED-CNN have no ablation: plain reconstruction losses on their own network.
PLAIN = Variant(use_dem=True, knowledge_transfer=False, contrast=False)


@dataclass(frozen=True)
class DataOptions:
    patch_size: int | None = None  # None: full slices, the paper's setting
    patches_per_epoch: int | None = None  # None: as many patches as training slices
    augment: bool = True
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    workers: int = 2
    # Seeds only the patient split, apart from --seed, so that changing the training seed never moves
    # patients between train and test (evaluate assigns splits with the same default).
    split_seed: int = 0
    # With a noise bank as --data: the dose fractions each training sample's dose is drawn from.
    dose_range: tuple[float, float] = DOSE_RANGE
    # With a noise bank: the share of training samples given no added noise (dose 1).
    clean_fraction: float = 0.0


@dataclass
class Recipe:
    """Everything that defines a run; stored in the resume state and the model card."""

    stage: str
    variant_name: str
    variant: Variant
    architecture: str
    settings: dict
    schedule: Schedule
    loss: LossWeights
    data: DataOptions
    seed: int
    amp: bool

    def to_dict(self) -> dict:
        return {
            "stage": self.stage, "variant": self.variant_name, "variant_switches": dataclasses.asdict(self.variant),
            "architecture": self.architecture, "settings": self.settings, "schedule": dataclasses.asdict(self.schedule),
            "loss_weights": active_loss_weights(self.loss, self.variant), "data": dataclasses.asdict(self.data), "seed": self.seed, "amp": self.amp,
            "augmentation": "random rotation by 0/90/180/270 degrees and horizontal flip" if self.data.augment else "none",
            "noise_bank_draws": {"dose_range": list(self.data.dose_range), "dose_distribution": "log-uniform",
                                 "clean_fraction": self.data.clean_fraction,
                                 "kernel_alpha_range": list(KERNEL_ALPHA_RANGE), "kernel_cutoff_range_cycles_per_pixel": list(KERNEL_CUTOFF_RANGE),
                                 "validation_doses": list(REPORT_DOSES), "validation_kernel": dataclasses.asdict(VALIDATION_KERNEL)},
        }


def active_loss_weights(loss: LossWeights, variant: Variant) -> dict:
    """The loss weights this variant actually uses, so a card never lists a term that was off."""
    weights = loss.to_dict()
    if not variant.knowledge_transfer:
        del weights["kt"]
    if not variant.contrast:
        for key in ("contrast", "betas", "contrast_floor", "contrast_eps"):
            del weights[key]
    if not loss.noise_floor:
        del weights["noise_floor"]
    return weights


def identity_of(recipe_dict: dict) -> dict:
    """What a resumed run must share with the original (the schedule may be extended)."""
    return {k: recipe_dict[k] for k in ("stage", "variant", "architecture", "settings")}


# ---------------------------------------------------------------- command-line values


def parse_int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# ---------------------------------------------------------------- recipe rules


def resolve_schedule(stage: str, args: argparse.Namespace) -> Schedule:
    """The stage's paper schedule with the command-line overrides applied and checked."""
    overrides = {field: getattr(args, name) for field, name in
                 (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr"), ("milestones", "milestones"), ("gamma", "lr_gamma"))
                 if getattr(args, name, None) is not None}
    schedule = dataclasses.replace(SCHEDULES[stage], **overrides)
    if schedule.epochs < 1 or schedule.batch_size < 1:
        raise CommandError("--epochs and --batch-size must be at least 1")
    if not schedule.lr > 0 or not schedule.gamma > 0:
        raise CommandError("--lr and --lr-gamma must be positive")
    return schedule


def lr_at(schedule: Schedule, epoch: int) -> float:
    """Learning rate of a 0-based epoch: lr × gamma per milestone already passed."""
    return schedule.lr * schedule.gamma ** sum(epoch >= m for m in schedule.milestones)


def resolve_variant(stage: str, variant: str | None) -> tuple[str, Variant]:
    if stage != "student":
        if variant is not None:
            raise CommandError(f"--variant applies to the student only, not to {stage}")
        return "-", PLAIN
    name = variant or DEFAULT_VARIANT
    return name, VARIANTS[name]


def resolve_architecture(stage: str, variant: Variant, args: argparse.Namespace, teacher_settings: dict | None) -> dict:
    """Network settings: the teacher's (a student must match it for knowledge transfer) or the
    model defaults, then the command-line overrides, then the variant's DEM switch."""
    overrides = {k: v for k, v in (("in_slices", args.in_slices), ("width", args.width), ("num_dems", args.num_dems),
                                   ("correction_highpass_sigma_px", args.highpass_sigma),
                                   ("attention_window", args.attention_window)) if v is not None}
    if stage == "redcnn":
        for key, flag in (("num_dems", "--num-dems"), ("correction_highpass_sigma_px", "--highpass-sigma"),
                          ("attention_window", "--attention-window")):
            if key in overrides:
                raise CommandError(f"{flag} applies to TSC-Net only, not to redcnn")
        return dataclasses.replace(REDCNNConfig(), **overrides).to_dict()
    base = TSCNetConfig.from_dict(teacher_settings) if teacher_settings else TSCNetConfig()
    return dataclasses.replace(base, **overrides, use_dem=variant.use_dem).to_dict()


def check_buildable(architecture: str, settings: dict) -> None:
    """Build the network once on the CPU so bad settings fail before any data is read."""
    if any(settings[key] < 1 for key in ("in_slices", "width", "num_dems") if key in settings):
        raise CommandError("--in-slices, --width and --num-dems must be at least 1")
    try:
        build_model(architecture, settings)
    except ValueError as exc:
        raise CommandError(f"cannot build {architecture} with {settings}: {exc}") from None


def check_teacher_fits(student: dict, teacher: dict) -> None:
    """Knowledge transfer compares feature maps: same width and input slices, and a DEM to tap."""
    for key in ("width", "in_slices"):
        if student[key] != teacher[key]:
            raise CommandError(f"student {key} {student[key]} differs from the teacher's {teacher[key]}: drop --{key.replace('_', '-')} or train a matching teacher")
    if student["feature_index"] >= teacher["num_dems"] or student["feature_index"] >= student["num_dems"]:
        raise CommandError(f"knowledge transfer taps DEM {student['feature_index'] + 1}, which the student or teacher lacks: use --num-dems ≥ {student['feature_index'] + 1}")


def loss_weights_from(args: argparse.Namespace) -> LossWeights:
    if len(args.betas) != len(LossWeights().betas):
        raise CommandError(f"--betas needs {len(LossWeights().betas)} values (conv1_2, conv2_2, conv3_3)")
    if args.smooth_l1_beta <= 0:
        raise CommandError("--smooth-l1-beta must be positive")
    if args.noise_weighted < 0:
        raise CommandError("--noise-weighted must be a noise SD in HU (e.g. 10), or 0 to switch it off")
    return LossWeights(pixel=args.w_pixel, smooth_l1_beta=args.smooth_l1_beta, msssim=args.w_msssim, kt=args.w_kt,
                       contrast=args.w_contrast, contrast_floor=args.contrast_floor, betas=tuple(args.betas),
                       noise_floor=(args.noise_weighted / InputScaling().span) ** 2)


def check_counts(args: argparse.Namespace) -> None:
    """Counts and fractions that argparse types alone cannot bound."""
    rules = [
        (args.val_every >= 0, "--val-every must be 0 (never) or more"),
        (args.workers >= 0, "--workers must be 0 or more"),
        (args.patches_per_epoch is None or args.patches_per_epoch >= 1, "--patches-per-epoch must be at least 1"),
        (args.patches_per_epoch is None or args.patch_size is not None, "--patches-per-epoch needs --patch-size"),
        (len(args.dose_range) == 2 and 0 < args.dose_range[0] <= args.dose_range[1] < 1,
         "--dose-range must be two dose fractions low,high with 0 < low <= high < 1"),
        (0 <= args.clean_fraction < 1, "--clean-fraction must lie in [0, 1)"),
        (0 <= args.val_fraction < 1 and 0 <= args.test_fraction < 1 and args.val_fraction + args.test_fraction < 1,
         "--val-fraction and --test-fraction must lie in [0, 1) and sum to less than 1"),
    ]
    for ok, message in rules:
        if not ok:
            raise CommandError(message)


def build_recipe(args: argparse.Namespace) -> Recipe:
    check_counts(args)
    variant_name, variant = resolve_variant(args.stage, args.variant)
    teacher_settings = None
    if variant.knowledge_transfer and args.teacher is not None:
        if not args.teacher.with_suffix(".safetensors").is_file():
            raise CommandError(f"--teacher {args.teacher} not found: pass the best.safetensors of a `ldct-node train teacher` run")
        teacher_settings = read_card(args.teacher).settings
    settings = resolve_architecture(args.stage, variant, args, teacher_settings)
    check_buildable(ARCHITECTURES[args.stage], settings)
    data = DataOptions(patch_size=args.patch_size, patches_per_epoch=args.patches_per_epoch, augment=not args.no_augment,
                       val_fraction=args.val_fraction, test_fraction=args.test_fraction, workers=args.workers,
                       split_seed=args.split_seed, dose_range=tuple(args.dose_range), clean_fraction=args.clean_fraction)
    return Recipe(stage=args.stage, variant_name=variant_name, variant=variant, architecture=ARCHITECTURES[args.stage],
                  settings=settings, schedule=resolve_schedule(args.stage, args), loss=loss_weights_from(args),
                  data=data, seed=args.seed, amp=not args.no_amp)
