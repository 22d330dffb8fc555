"""The noise bank: manifest and checksums, cached unit noise, and fresh low dose drawn from it at every step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ldct_node.cli import main
from ldct_node.errors import CommandError
from ldct_node.net.weights import InputScaling, load_weights, sha256_of
from ldct_train.bank import (
    REPORT_DOSES,
    VALIDATION_KERNEL,
    BankSlices,
    describe_bank,
    draw_dose,
    draw_kernel,
    load_bank,
    load_manifest,
    mixed,
    noise_for,
)
from ldct_train.simulate import KERNEL_ALPHA_RANGE, KERNEL_CUTOFF_RANGE, KERNELS, Kernel, kernel_window
from tests.synthetic import ct_series, write_series

SOURCE = '''
[[source]]
id = "{id}"
root = "{root}"
files = ["IM*"]
patient = "{patient}"
vendor = "{vendor}"
scanner = "synthetic"
kernel = "standard"
body_part = "phantom"
licence = "CC0"
licence_source = "made by the test"
citation = "none"
split = "{split}"
'''


def write_source(root: Path, name: str, count: int) -> list[str]:
    paths = write_series(root / name, ct_series(count, rows=96, columns=96, fov_fill_hu=None))
    return [str(p.relative_to(root)) for p in paths]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> tuple[Path, Path]:
    """A local copy with two patients (train: vendor A, val: vendor B), its manifest and checksums."""
    root = tmp_path_factory.mktemp("root")
    names = write_source(root, "a", 3) + write_source(root, "b", 2)
    manifest = root / "manifest.toml"
    manifest.write_text(SOURCE.format(id="a", root="a", patient="P1", vendor="A", split="train")
                        + SOURCE.format(id="b", root="b", patient="P2", vendor="B", split="val"))
    (root / "checksums.sha256").write_text("".join(f"{sha256_of(root / n)}  {n}\n" for n in names))
    return root, manifest


@pytest.fixture(scope="module")
def bank(data_root, tmp_path_factory) -> Path:
    root, manifest = data_root
    out = tmp_path_factory.mktemp("bank")
    assert main(["prepare", "--manifest", str(manifest), "--root", str(root), "--out", str(out), "--views", "96",
                 "--device", "cpu"]) == 0
    return out


def test_bank_holds_every_manifest_slice_with_its_licence_and_split(bank):
    assert [len(load_bank(bank, s)) for s in ("train", "val")] == [3, 2]
    described = describe_bank(bank)["splits"]
    assert described["train"]["a"]["licence"] == "CC0" and described["val"]["b"]["vendor"] == "B"
    item = load_bank(bank, "train")[0]
    assert item.quantum.shape == (2, 96, 96) and item.electronic.shape == (2, 96, 96)


def test_a_changed_file_is_refused_by_its_checksum(data_root, tmp_path, capsys):
    root, manifest = data_root
    changed = tmp_path / "root"
    for path in root.rglob("*"):
        if path.is_file():
            target = changed / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    victim = sorted((changed / "a").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:-2] + b"\0\1")
    assert main(["prepare", "--manifest", str(manifest), "--root", str(changed), "--out", str(tmp_path / "out"),
                 "--views", "96", "--device", "cpu"]) == 2
    assert "differ from the manifest's checksums" in capsys.readouterr().err


def test_a_reformatted_slice_is_refused_before_any_noise_is_simulated(tmp_path, capsys):
    coronal = ct_series(1, rows=96, columns=96, fov_fill_hu=None)
    coronal[0].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    names = [str(p.relative_to(tmp_path)) for p in write_series(tmp_path / "a", coronal)]
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(SOURCE.format(id="a", root="a", patient="P1", vendor="A", split="train"))
    (tmp_path / "checksums.sha256").write_text("".join(f"{sha256_of(tmp_path / n)}  {n}\n" for n in names))
    assert main(["prepare", "--manifest", str(manifest), "--root", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--views", "96", "--device", "cpu"]) == 2
    assert "not an axial slice" in capsys.readouterr().err


def test_a_missing_local_copy_says_what_to_fetch(data_root, tmp_path, capsys):
    _, manifest = data_root
    assert main(["prepare", "--manifest", str(manifest), "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "fetch the sources" in capsys.readouterr().err


def test_manifest_with_an_unknown_split_is_refused(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(SOURCE.format(id="a", root="a", patient="P", vendor="V", split="holdout"))
    with pytest.raises(CommandError, match="split"):
        load_manifest(path)


def test_shipped_manifest_names_at_least_three_vendors_and_keeps_validation_patients_out_of_training():
    sources = load_manifest(Path(__file__).parent.parent / "train" / "data" / "manifest.toml")
    assert len({s.vendor for s in sources}) >= 3
    train_patients = {s.patient for s in sources if s.split == "train"}
    val = [s for s in sources if s.split == "val"]
    assert val and not train_patients & {s.patient for s in val}
    assert not {s.vendor for s in val} & {s.vendor for s in sources if s.split == "train"}
    assert all(s.licence in ("CC BY 4.0", "BSD-2-Clause") for s in sources)


def test_mixing_two_realisations_keeps_the_noise_variance():
    rng = np.random.default_rng(0)
    cached = rng.normal(0.0, 5.0, (2, 256, 256)).astype(np.float32)
    draws = [mixed(cached, np.random.default_rng(s)) for s in range(3)]
    assert all(abs(d.std() - 5.0) < 0.1 for d in draws)
    assert not np.allclose(draws[0], draws[1])


def test_noise_is_scaled_to_the_drawn_dose_and_has_zero_mean(bank):
    item = load_bank(bank, "train")[0]
    window = (slice(16, 80), slice(16, 80))
    sd = {d: noise_for(item, window, d, Kernel(1.0, 0.5), np.random.default_rng(1)).std() for d in (0.5, 0.05)}
    # the quantum term dominates: sqrt((1 - d) / d)
    assert sd[0.05] / sd[0.5] == pytest.approx(math.sqrt(0.95 / 0.05), rel=0.2)
    means = [noise_for(item, window, 0.1, VALIDATION_KERNEL, np.random.default_rng(s)).mean() for s in range(8)]
    assert abs(np.mean(means)) < 0.05 * sd[0.05]


def test_doses_are_drawn_over_the_whole_range():
    doses = [draw_dose(np.random.default_rng(s)) for s in range(400)]
    assert 0.05 <= min(doses) < 0.06 and 0.45 < max(doses) <= 0.5


def test_drawn_kernels_never_invert_a_frequency_and_the_validation_kernel_is_among_them():
    """A window below zero would flip the sign of those frequencies: no reconstruction kernel does that."""
    for seed in range(50):
        kernel = draw_kernel(np.random.default_rng(seed))
        assert kernel_window(64, 64, kernel, "cpu").min() >= 0.0
    assert KERNEL_ALPHA_RANGE[0] <= VALIDATION_KERNEL.alpha <= KERNEL_ALPHA_RANGE[1]
    assert KERNEL_CUTOFF_RANGE[0] <= VALIDATION_KERNEL.cutoff <= KERNEL_CUTOFF_RANGE[1]


def test_training_noise_stays_in_the_range_of_real_soft_tissue_kernels(bank):
    """The sharpest drawn kernel adds less noise than the bare ramp (bone kernels), the smoothest
    less than the soft-tissue 'smooth' preset: the range brackets the kernels soft tissue is read in."""
    item = load_bank(bank, "train")[0]
    window = (slice(16, 80), slice(16, 80))

    def sd(kernel):
        return noise_for(item, window, 0.25, kernel, np.random.default_rng(3)).std()

    sharpest = Kernel(KERNEL_ALPHA_RANGE[1], KERNEL_CUTOFF_RANGE[1])
    smoothest = Kernel(KERNEL_ALPHA_RANGE[0], KERNEL_CUTOFF_RANGE[0])
    assert sd(smoothest) < sd(KERNELS["smooth"]) < sd(KERNELS["hann"]) < sd(sharpest) < 0.8 * sd(KERNELS["ramp"])


def test_every_training_item_gets_new_noise_and_validation_items_are_fixed(bank):
    scaling = InputScaling()
    train = BankSlices(load_bank(bank, "train"), scaling, patch_size=32, patches_per_epoch=4, augment=True)
    first = [train[i]["low"] - train[i]["normal"] for i in range(4)]
    train.set_epoch(1)
    second = [train[i]["low"] - train[i]["normal"] for i in range(4)]
    assert all(not torch.equal(a, b) for a, b in zip(first, second))
    val = BankSlices(load_bank(bank, "val"), scaling)
    assert len(val) == 2 * len(REPORT_DOSES)
    assert torch.equal(val[1]["low"], val[1]["low"]) and val[0]["low"].shape == (1, 96, 96)


def test_a_clean_fraction_of_training_items_carries_no_noise_and_the_rest_do(bank):
    train = BankSlices(load_bank(bank, "train"), InputScaling(), patch_size=32, patches_per_epoch=200, clean_fraction=0.25)
    clean = [torch.equal(item["low"], item["normal"]) for item in (train[i] for i in range(200))]
    assert 0.15 < np.mean(clean) < 0.35
    untouched = BankSlices(load_bank(bank, "train"), InputScaling(), patch_size=32, patches_per_epoch=50)
    assert not any(torch.equal(item["low"], item["normal"]) for item in (untouched[i] for i in range(50)))


def test_student_trains_on_a_noise_bank_and_its_card_names_the_sources(bank, tmp_path):
    out = tmp_path / "s"
    assert main(["train", "student", "--variant", "A", "--width", "4", "--num-dems", "2", "--highpass-sigma", "3", "--data", str(bank), "--out", str(out),
                 "--epochs", "1", "--patch-size", "32", "--patches-per-epoch", "4", "--batch-size", "2", "--workers", "0"]) == 0
    card = load_weights(out / "best.safetensors").card
    assert card.data["splits"]["val"]["b"]["patient"] == "P2"
    assert card.training["noise_bank_draws"]["dose_range"] == [0.05, 0.5]


def test_a_noise_bank_refuses_neighbour_slices(bank, tmp_path, capsys):
    assert main(["train", "student", "--variant", "A", "--width", "4", "--in-slices", "3", "--data", str(bank),
                 "--out", str(tmp_path / "x"), "--epochs", "1"]) == 2
    assert "--in-slices 1" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluation_report_on_the_banks_held_out_vendor_at_one_dose(bank, tiny_weights, tmp_path):
    report = tmp_path / "report"
    assert main(["evaluate", "--data", str(bank), "--split", "val", "--dose", "0.25", "--weights", f"tiny={tiny_weights}",
                 "--report", str(report), "--device", "cpu"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    text = json.dumps(metrics)
    assert "HU bias in soft tissue" in text and "noise" in text
    low_dose, tiny = metrics["methods"]["Low-dose input"], metrics["methods"]["tiny"]
    # an untrained TSC-Net is the identity: its per-slice numbers are the input's
    assert tiny["per_slice"]["psnr_soft"] == pytest.approx(low_dose["per_slice"]["psnr_soft"])


def test_evaluation_at_several_doses_writes_a_report_per_dose_and_one_summary(bank, tiny_weights, tmp_path):
    report = tmp_path / "report"
    assert main(["evaluate", "--data", str(bank), "--split", "val", "--dose", "0.1,0.5", "--weights", f"tiny={tiny_weights}",
                 "--report", str(report), "--device", "cpu"]) == 0
    noisier, cleaner = (json.loads((report / f"dose-{p}" / "metrics.json").read_text()) for p in ("10", "50"))
    assert noisier["methods"]["Low-dose input"]["mean"]["psnr_soft"] < cleaner["methods"]["Low-dose input"]["mean"]["psnr_soft"]
    summary = (report / "summary.md").read_text()
    assert "## 10 % dose" in summary and "## 50 % dose" in summary and "p (PSNR soft) vs tiny" in summary
    pooled = json.loads((report / "summary.json").read_text())["pooled_psnr_soft"]
    # 2 validation slices at 2 doses: 4 cases per method; TV differs from the identity network on every one
    assert len(pooled["TV"]["difference"]) == 4 and all(d != 0 for d in pooled["TV"]["difference"])


def test_evaluating_a_noise_bank_needs_a_dose(bank, tiny_weights, tmp_path, capsys):
    assert main(["evaluate", "--data", str(bank), "--split", "val", "--weights", str(tiny_weights),
                 "--report", str(tmp_path / "r")]) == 2
    assert "--dose" in capsys.readouterr().err
