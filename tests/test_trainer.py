"""The trainer: recipe rules, a short real training run, checkpoints, resume, the ablation and RED-CNN."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ldct_node.cli import main
from ldct_node.errors import CommandError
from ldct_node.net.model import TSCNet, TSCNetConfig
from ldct_node.net.weights import ModelCard, load_weights, save_weights
from ldct_train import trainer
from ldct_train.losses import LossWeights
from ldct_train.recipe import (
    SCHEDULES,
    VARIANTS,
    Schedule,
    active_loss_weights,
    build_recipe,
    check_teacher_fits,
    loss_weights_from,
    lr_at,
    resolve_architecture,
    resolve_schedule,
    resolve_variant,
)
from ldct_train.trainer import add_arguments, write_metrics_csv

SIZE = 24
SLICES = 4


def phantom_volume(seed: int) -> np.ndarray:
    """Air around a water disc with a few inserts (fat, soft tissue, bone), SLICES × SIZE²."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = []
    for _ in range(SLICES):
        image = np.full((SIZE, SIZE), -1000.0)
        image[(yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < (0.42 * SIZE) ** 2] = 40.0
        for _ in range(2):
            cy, cx = rng.integers(7, SIZE - 7, 2)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(2, 4) ** 2] = rng.choice([-100.0, 300.0, 900.0])
        out.append(image)
    return np.stack(out).astype(np.float32)


def make_pairs(folder: Path, patients: int = 3, noise_hu: float = 80.0) -> Path:
    """Tiny NIfTI pairs (low = normal + noise); the last patient is the validation split."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(123)
    text = ""
    for p in range(patients):
        normal = phantom_volume(p)
        low = normal + rng.normal(0.0, noise_hu, normal.shape).astype(np.float32)
        for name, volume in (("nd", normal), ("ld", low)):
            image = sitk.GetImageFromArray(volume)
            image.SetSpacing((1.0, 1.0, 2.0))
            sitk.WriteImage(image, str(folder / f"p{p}_{name}.nii.gz"))
        split = "val" if p == patients - 1 else "train"
        text += f'[[pair]]\npatient = "P{p}"\nlow = "p{p}_ld.nii.gz"\nnormal = "p{p}_nd.nii.gz"\nsplit = "{split}"\n\n'
    path = folder / "pairs.toml"
    path.write_text(text)
    return path


def write_teacher(path: Path, config: TSCNetConfig) -> Path:
    torch.manual_seed(7)
    card = ModelCard(name="tscnet-teacher", version="test", architecture="tscnet", settings=config.to_dict())
    return save_weights(TSCNet(config).eval(), card, path)


def train(*args: str) -> int:
    return main(["train", *map(str, args), "--workers", "0", "--log-level", "warning"])


def read_metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["student", "--data", "p.toml", "--out", "o", *argv])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("pairs"))


# ---------------------------------------------------------------- recipe rules


def test_default_schedules_are_the_papers():
    assert SCHEDULES["teacher"] == Schedule(epochs=10, batch_size=4, milestones=(2, 4), lr=1e-4, gamma=0.5, adam_betas=(0.9, 0.999))
    assert SCHEDULES["student"] == Schedule(epochs=35, batch_size=2, milestones=(10, 20))


def test_learning_rate_halves_after_each_milestone():
    schedule = SCHEDULES["teacher"]
    assert [lr_at(schedule, e) for e in range(6)] == [1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5, 2.5e-5]


def test_schedule_overrides_apply_and_are_checked():
    schedule = resolve_schedule("student", parse("--epochs", "3", "--milestones", "1,2", "--lr", "1e-3"))
    assert (schedule.epochs, schedule.milestones, schedule.lr, schedule.batch_size) == (3, (1, 2), 1e-3, 2)
    with pytest.raises(CommandError, match="at least 1"):
        resolve_schedule("student", parse("--batch-size", "0"))


def test_variants_switch_dem_knowledge_transfer_and_contrast():
    switches = {name: resolve_variant("student", name)[1] for name in "ABCD"}
    assert [(v.use_dem, v.knowledge_transfer, v.contrast) for v in switches.values()] == [
        (False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    assert resolve_variant("student", None)[0] == "D"
    with pytest.raises(CommandError, match="student only"):
        resolve_variant("teacher", "B")


def test_student_architecture_follows_the_teacher_unless_overridden():
    teacher = TSCNetConfig(width=8, num_dems=3, in_slices=3).to_dict()
    variant_a = resolve_variant("student", "A")[1]
    assert resolve_architecture("student", variant_a, parse(), teacher) == {**teacher, "use_dem": False}
    assert resolve_architecture("student", variant_a, parse("--width", "4"), None)["width"] == 4
    with pytest.raises(CommandError, match="TSC-Net only"):
        resolve_architecture("redcnn", variant_a, parse("--num-dems", "2"), None)


def test_card_lists_only_the_loss_terms_a_variant_uses():
    variant_b = resolve_variant("student", "B")[1]
    assert set(active_loss_weights(LossWeights(), variant_b)) == {"pixel", "smooth_l1_beta", "msssim"}
    variant_d = resolve_variant("student", "D")[1]
    assert active_loss_weights(LossWeights(), variant_d)["betas"] == (0.25, 0.5, 1.0)


def test_teacher_must_match_the_student_for_knowledge_transfer():
    student = TSCNetConfig(width=8).to_dict()
    check_teacher_fits(student, TSCNetConfig(width=8, use_dem=True).to_dict())
    with pytest.raises(CommandError, match="width 8 differs from the teacher's 16"):
        check_teacher_fits(student, TSCNetConfig(width=16).to_dict())
    with pytest.raises(CommandError, match="taps DEM 2"):
        check_teacher_fits(student, TSCNetConfig(width=8, num_dems=1, feature_index=0).to_dict())


@pytest.mark.parametrize("argv, message", [
    (("--val-every", "-1"), "--val-every"),
    (("--patches-per-epoch", "5"), "needs --patch-size"),
    (("--val-fraction", "0.6", "--test-fraction", "0.5"), "sum to less than 1"),
    (("--variant", "B", "--in-slices", "2"), "in_slices must be odd"),
    (("--variant", "B", "--width", "0"), "at least 1"),
    (("--dose-range", "0.5,0.05"), "--dose-range"),
    (("--dose-range", "0.05,1.5"), "--dose-range"),
    (("--clean-fraction", "1"), "--clean-fraction"),
])
def test_impossible_counts_are_refused_before_any_data_is_read(argv, message):
    with pytest.raises(CommandError, match=message):
        build_recipe(parse(*argv))


def test_metrics_csv_has_one_row_per_epoch_with_all_columns(tmp_path):
    write_metrics_csv(tmp_path / "m.csv", [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4, "val_psnr_db": 30.0}])
    with open(tmp_path / "m.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[1]["val_psnr_db"] == "30.0" and rows[0]["val_psnr_db"] == ""


# ---------------------------------------------------------------- real runs


def test_short_student_run_lowers_the_loss_and_writes_loadable_weights(pairs, tmp_path):
    teacher = write_teacher(tmp_path / "teacher.safetensors", TSCNetConfig(width=4, num_dems=2))
    out = tmp_path / "s"
    assert train("student", "--teacher", teacher, "--data", pairs, "--out", out, "--epochs", 3, "--lr", "2e-3",
                 "--milestones", "", "--batch-size", 2) == 0
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    losses = [float(r["train_total"]) for r in rows]
    assert losses[-1] < losses[0], losses
    assert {"train_pixel", "train_msssim", "train_kt", "train_contrast", "val_psnr_db"} <= set(rows[0])
    for stem in ("last", "best"):
        loaded = load_weights(out / f"{stem}.safetensors")
        assert loaded.card.name == "tscnet-student" and loaded.card.settings["width"] == 4
    card = load_weights(out / "last.safetensors").card
    assert card.input_scaling.hu_min == -1024.0 and card.input_scaling.hu_max == 3072.0
    assert card.training["variant"] == "D" and card.training["teacher"]["sha256"]
    assert card.training["loss_weights"]["contrast"] == 0.001 and card.training["epochs_completed"] == 3
    assert 'patient = "P0"' in card.data["pairs_file_text"] and card.data["splits"]["val"][0]["patient"] == "P2"
    best_epoch = max(rows, key=lambda r: float(r["val_psnr_db"]))["epoch"]
    assert load_weights(out / "best.safetensors").card.metrics["validation"]["epoch"] == int(best_epoch)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_continues_from_the_last_epoch(pairs, tmp_path):
    out = tmp_path / "b"
    common = ("student", "--variant", "B", "--width", "4", "--num-dems", "2", "--data", pairs, "--out", out,
              "--patch-size", "16", "--patches-per-epoch", "4")
    assert train(*common, "--epochs", 1) == 0
    after_one = load_weights(out / "last.safetensors").model.state_dict()
    assert train(*common, "--epochs", 2) == 2  # without --resume an existing run is never overwritten
    assert train(*common, "--epochs", 2, "--resume") == 0
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    resumed = load_weights(out / "last.safetensors")
    assert resumed.card.training["epochs_completed"] == 2
    assert any(not torch.equal(after_one[k], v) for k, v in resumed.model.state_dict().items())
    # a fresh two-epoch run ends where the interrupted-and-resumed one did
    fresh = tmp_path / "fresh"
    assert train(*[fresh if a == out else a for a in common], "--epochs", 2) == 0
    straight = load_weights(fresh / "last.safetensors").model.state_dict()
    assert all(torch.allclose(straight[k], v, atol=1e-6) for k, v in resumed.model.state_dict().items())


def test_resume_of_a_different_run_is_refused(pairs, tmp_path):
    out = tmp_path / "b"
    common = ("--width", "4", "--num-dems", "2", "--data", pairs, "--out", out, "--patch-size", "16", "--patches-per-epoch", "2", "--epochs", 1)
    assert train("student", "--variant", "B", *common) == 0
    assert train("student", "--variant", "A", *common, "--resume") == 2


def test_init_starts_from_given_weights_and_refuses_another_architecture(pairs, tmp_path, capsys):
    common = ("student", "--variant", "B", "--num-dems", "2", "--data", pairs, "--patch-size", "16", "--patches-per-epoch", "2",
              "--epochs", 1, "--lr", "1e-12")
    start = write_teacher(tmp_path / "start.safetensors", TSCNetConfig(width=4, num_dems=2))
    assert train(*common, "--width", "4", "--init", start, "--out", tmp_path / "ft") == 0
    tuned = load_weights(tmp_path / "ft" / "last.safetensors")
    original = load_weights(start).model.state_dict()
    assert all(torch.allclose(original[k], v, atol=1e-6) for k, v in tuned.model.state_dict().items())  # lr ≈ 0: unchanged
    assert tuned.card.training["initialised_from"]["sha256"] == load_weights(start).card.sha256
    assert train(*common, "--width", "8", "--init", start, "--out", tmp_path / "wide") == 2
    assert "--init" in capsys.readouterr().err
    assert train(*common, "--width", "4", "--init", start, "--resume", "--out", tmp_path / "ft") == 2


def test_noise_weighting_is_recorded_on_the_card_only_when_on():
    assert loss_weights_from(parse("--noise-weighted", "10")).noise_floor == pytest.approx((10 / 4096) ** 2)
    assert "noise_floor" not in active_loss_weights(loss_weights_from(parse()), VARIANTS["D"])
    assert "noise_floor" in active_loss_weights(loss_weights_from(parse("--noise-weighted", "10")), VARIANTS["D"])
    with pytest.raises(CommandError, match="noise-weighted"):
        loss_weights_from(parse("--noise-weighted", "-1"))


def test_knowledge_transfer_variant_without_teacher_says_what_to_pass(pairs, tmp_path, capsys):
    assert train("student", "--variant", "C", "--data", pairs, "--out", tmp_path / "c", "--epochs", 1) == 2
    assert "needs --teacher" in capsys.readouterr().err


def test_teacher_stage_learns_normal_to_normal_and_redcnn_trains_on_the_same_data(pairs, tmp_path, monkeypatch):
    seen = []
    original = trainer.Trainer._inputs

    def spy(self, batch):
        x, normal, ld, nd = original(self, batch)
        seen.append((self.recipe.stage, torch.equal(x, normal)))
        return x, normal, ld, nd

    monkeypatch.setattr(trainer.Trainer, "_inputs", spy)
    assert train("teacher", "--width", "4", "--num-dems", "2", "--data", pairs, "--out", tmp_path / "t", "--epochs", 1) == 0
    assert train("redcnn", "--width", "4", "--data", pairs, "--out", tmp_path / "r", "--epochs", 1) == 0
    assert {s for s, same in seen if same} == {"teacher"} and ("redcnn", False) in seen
    assert load_weights(tmp_path / "t" / "best.safetensors").card.name == "tscnet-teacher"
    assert load_weights(tmp_path / "r" / "best.safetensors").card.architecture == "redcnn"


def test_no_validation_split_is_a_clear_error_unless_validation_is_off(tmp_path, capsys):
    pairs = make_pairs(tmp_path / "data", patients=2)
    pairs.write_text(pairs.read_text().replace('split = "val"', 'split = "train"'))
    common = ("student", "--variant", "A", "--width", "4", "--data", pairs, "--epochs", 1)
    assert train(*common, "--out", tmp_path / "a") == 2
    assert "no validation pairs" in capsys.readouterr().err
    assert train(*common, "--out", tmp_path / "b", "--val-every", 0) == 0
    assert not (tmp_path / "b" / "best.safetensors").exists() and (tmp_path / "b" / "last.safetensors").exists()


def test_mixed_precision_runs_the_network_in_bf16_but_the_losses_in_float32(pairs, tmp_path, monkeypatch):
    # CPU autocast stands in for CUDA here: the same code path, minus the device.
    monkeypatch.setattr(trainer, "autocast_dtype", lambda device, enabled: torch.bfloat16)
    conv_dtypes, loss_autocast = [], []
    build = trainer.build_model

    def build_with_hook(name, settings):
        model = build(name, settings)
        model.enc0.register_forward_hook(lambda module, args, output: conv_dtypes.append(output.dtype))
        return model

    def spy(weights, inputs, vgg=None):
        loss_autocast.append(torch.is_autocast_enabled("cpu"))
        return original(weights, inputs, vgg)

    original = trainer.total_loss
    monkeypatch.setattr(trainer, "build_model", build_with_hook)
    monkeypatch.setattr(trainer, "total_loss", spy)
    teacher = write_teacher(tmp_path / "teacher.safetensors", TSCNetConfig(width=4, num_dems=2))
    assert train("student", "--teacher", teacher, "--data", pairs, "--out", tmp_path / "s", "--epochs", 1,
                 "--patch-size", "16", "--patches-per-epoch", "2") == 0
    assert conv_dtypes and set(conv_dtypes) == {torch.bfloat16}
    assert loss_autocast == [False]


def test_card_data_file_is_merged_into_the_model_card(pairs, tmp_path):
    extra = tmp_path / "card.json"
    extra.write_text(json.dumps({"dose_fraction": 0.05, "citation": "TCIA Pancreatic-CT-CBCT-SEG", "slices": "ignored"}))
    out = tmp_path / "a"
    assert train("student", "--variant", "A", "--width", "4", "--data", pairs, "--out", out, "--epochs", 1,
                 "--card-data", extra) == 0
    data = load_weights(out / "last.safetensors").card.data
    assert data["dose_fraction"] == 0.05 and data["citation"].startswith("TCIA")
    assert data["slices"] == {"train": 2 * SLICES, "val": SLICES}


@pytest.mark.slow
def test_a_single_patient_is_cut_into_slabs_that_train_and_evaluate_share(tmp_path, capsys):
    from ldct_train.metrics import slice_metrics

    normal = np.concatenate([phantom_volume(seed) for seed in range(5)])  # 20 slices
    low = normal + np.random.default_rng(4).normal(0.0, 80.0, normal.shape).astype(np.float32)
    for name, volume in (("nd", normal), ("ld", low)):
        image = sitk.GetImageFromArray(volume)
        image.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(image, str(tmp_path / f"{name}.mha"))
    pairs = tmp_path / "pairs.toml"
    pairs.write_text('[[pair]]\npatient = "P0"\nlow = "ld.mha"\nnormal = "nd.mha"\n')
    out = tmp_path / "a"
    assert train("student", "--variant", "A", "--width", "4", "--num-dems", "2", "--in-slices", "3",
                 "--data", pairs, "--out", out, "--epochs", 1) == 0
    data = load_weights(out / "last.safetensors").card.data
    assert [(name, [s["slices"] for s in group]) for name, group in data["splits"].items()] == \
        [("train", [[0, 6]]), ("val", [[11, 13]]), ("test", [[18, 20]])]
    assert data["slices"] == {"train": 6, "val": 2}
    assert data["automatic_slabs"] == [{"patient": "P0", "slices": 20, "gap": 5, "train": [0, 6], "val": [11, 13], "test": [18, 20]}]
    capsys.readouterr()

    report = tmp_path / "report"
    assert main(["evaluate", "--weights", str(out / "last.safetensors"), "--data", str(pairs), "--report", str(report),
                 "--device", "cpu"]) == 0
    assert "single patient P0 cut into slabs of its 20 matched slices: train [0, 6), val [11, 13), test [18, 20)" in capsys.readouterr().out
    scored = json.loads((report / "metrics.json").read_text())
    assert scored["slices"] == 2
    expected = [slice_metrics(low[i], normal[i])["psnr_full"] for i in (18, 19)]
    assert scored["methods"]["Low-dose input"]["per_slice"]["psnr_full"] == pytest.approx(expected)
