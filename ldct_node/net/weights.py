"""Weights files: tensors in safetensors plus a JSON model card beside them.

``NAME.safetensors`` holds only tensors, so loading never unpickles code. ``NAME.json`` is the
model card: architecture and its settings, input scaling with its HU range, training data and
recipe, metrics, version and the sha256 of the tensor file. The card is the one place where the
input scaling is stated; inference and training both read it from here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from ldct_node.durable import atomic_write_bytes
from ldct_node.errors import UserError
from ldct_node.net.model import build_model

CARD_FORMAT = "ldct-node-weights/1"
SHIPPED_STEM = "tscnet-student-v2"


class WeightsError(UserError, RuntimeError):
    """A weights problem, with a one-line message that says what to do."""


@dataclass(frozen=True)
class InputScaling:
    """Network input x = (clip(HU, hu_min, hu_max) − hu_min) / (hu_max − hu_min)."""

    hu_min: float = -1024.0
    hu_max: float = 3072.0

    @property
    def span(self) -> float:
        return self.hu_max - self.hu_min

    def to_unit(self, hu: np.ndarray | torch.Tensor):
        clip = torch.clamp if isinstance(hu, torch.Tensor) else np.clip
        return (clip(hu, self.hu_min, self.hu_max) - self.hu_min) / self.span

    def to_hu(self, unit: np.ndarray | torch.Tensor):
        return unit * self.span + self.hu_min

    def describe(self) -> str:
        return f"x = (clip(HU, {self.hu_min:g}, {self.hu_max:g}) - ({self.hu_min:g})) / {self.span:g}"


@dataclass
class ModelCard:
    name: str
    version: str
    architecture: str
    settings: dict
    input_scaling: InputScaling = field(default_factory=InputScaling)
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    license: str = ""
    sha256: str = ""

    @property
    def in_slices(self) -> int:
        return int(self.settings.get("in_slices", 1))

    @property
    def model_id(self) -> str:
        """Name and version: what derived series record, and what their UIDs depend on."""
        return f"{self.name} {self.version}"

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["input_scaling"]["formula"] = self.input_scaling.describe()
        return {"format": CARD_FORMAT, **out}

    @classmethod
    def from_json(cls, data: dict, where: Path) -> "ModelCard":
        if data.get("format") != CARD_FORMAT:
            raise WeightsError(f"model card {where} is not in format {CARD_FORMAT}: use a card written by ldct-node")
        data = {k: v for k, v in data.items() if k != "format"}
        scaling = {k: v for k, v in data.pop("input_scaling", {}).items() if k != "formula"}
        try:
            return cls(input_scaling=InputScaling(**scaling), **data)
        except TypeError as exc:
            raise WeightsError(f"model card {where} has unexpected or missing fields ({exc}): regenerate it") from None


@dataclass
class LoadedModel:
    model: nn.Module
    card: ModelCard
    path: Path


def card_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_weights(model: nn.Module, card: ModelCard, path: Path) -> Path:
    """Write PATH.safetensors and its model card; returns the tensor file's path."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    data = save(tensors, metadata={"format": CARD_FORMAT})
    atomic_write_bytes(path, data)
    card.sha256 = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(card_path(path), (json.dumps(card.to_json(), indent=2) + "\n").encode())
    return path


def read_card(path: Path) -> ModelCard:
    path = Path(path).with_suffix(".safetensors")
    cpath = card_path(path)
    if not cpath.is_file():
        raise WeightsError(f"model card {cpath} is missing next to the weights: copy the .json that came with {path.name}")
    try:
        data = json.loads(cpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"model card {cpath} is not valid JSON ({exc}): restore it from the release") from None
    return ModelCard.from_json(data, cpath)


def load_weights(path: Path | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the network its card describes and load its tensors, verifying the checksum."""
    path = Path(path).with_suffix(".safetensors") if path is not None else default_weights_path()
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found: pass --weights PATH (or set [model] weights) to a .safetensors file, or reinstall ldct-node for the shipped weights")
    card = read_card(path)
    if card.sha256 and sha256_of(path) != card.sha256:
        raise WeightsError(f"weights file {path} does not match the sha256 in its model card (corrupt or replaced): restore both files from the release")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"weights file {path} is not a readable safetensors file ({exc}): restore it from the release") from None
    try:
        model = build_model(card.architecture, card.settings)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"model card {card_path(path)} describes an architecture this version cannot build ({exc}): upgrade ldct-node or use matching weights") from None
    missing, unexpected, bad_shape = _compare(model.state_dict(), tensors)
    if missing or unexpected or bad_shape:
        detail = "; ".join(
            f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape))
            if names
        )
        raise WeightsError(f"weights file {path} does not fit the architecture in its model card ({detail}): use the card that came with these weights")
    model.load_state_dict(tensors)
    model.to(device).eval()
    return LoadedModel(model=model, card=card, path=path)


def _compare(expected: dict, found: dict) -> tuple[list[str], list[str], list[str]]:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    bad_shape = sorted(k for k in set(expected) & set(found) if tuple(expected[k].shape) != tuple(found[k].shape))
    return missing, unexpected, bad_shape


def shipped_weights_dirs() -> list[Path]:
    """Where the shipped weights live: the source tree (editable install) or the installed data files."""
    return [Path(__file__).resolve().parents[2] / "weights", Path(sys.prefix) / "share" / "ldct-node" / "weights"]


def default_weights_path() -> Path:
    candidates = [d / f"{SHIPPED_STEM}.safetensors" for d in shipped_weights_dirs()]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise WeightsError(f"shipped weights not found (looked in {looked}): reinstall ldct-node, or pass --weights PATH (or set [model] weights)")
