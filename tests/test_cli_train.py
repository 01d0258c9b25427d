"""train.py and adapt.py end to end, as a user runs them (subprocess, synthetic data)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MULT = ["--mult", "0.125"]  # not with --arch: the architecture file sets the width
TINY = [
    "--dataset",
    "synthetic",
    "--limit-train",
    "300",
    "--limit-test",
    "100",
    "--val-fraction",
    "0.02",
    "--batch_size",
    "32",
    "--no-progress",
]


def run(script, *args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_train_then_adapt_then_arch(tmp_path):
    out = tmp_path / "runs"
    normal = ["--use_normal_conv", "--Q", "--bits", "8", "--epochs", "1", "--outDir", str(out)]
    normal += MULT
    r = run("train.py", *normal, *TINY)
    assert r.returncode == 0, r.stderr
    run_dir = out / "synthetic_normal_8bit_w0.125_seed0"
    assert "layer4.1.conv2" in r.stdout and "SYNTHETIC" in r.stdout
    files = ("config.json", "arch.yaml", "summary.txt", "metrics.csv", "best.pt", "final.json")
    for name in files:
        assert (run_dir / name).is_file(), name
    assert 0 <= json.loads((run_dir / "final.json").read_text())["test_acc"] <= 1

    # The run folder exists: a second identical run refuses instead of overwriting.
    again = run("train.py", *normal, *TINY)
    assert again.returncode == 2 and "--resume" in again.stderr
    assert "Traceback" not in again.stderr

    r = run(
        "adapt.py",
        "--modelDir",
        str(run_dir),
        "--flex",
        "--F",
        "4",
        "--epochs",
        "1",
        "--Q",
        "--bits",
        "8",
        "--transform-lr",
        "0.01",
        "--outDir",
        str(out),
        *MULT,
        *TINY,
    )
    assert r.returncode == 0, r.stderr
    adapted = out / "adapt_synthetic_flex_F4_tap_ttap_8bit_w0.125_seed0"  # the defaults
    assert "initialized from" in r.stdout and (adapted / "best.pt").is_file()
    assert json.loads((adapted / "config.json").read_text())["train"]["transform_lr"] == 0.01

    arch_file = tmp_path / "mixed.yaml"
    arch_file.write_text(
        "width: 0.125\ndefault: {conv: normal, bits: 8}\n"
        "layers:\n  layer2.0.conv1: {conv: static, tile: 2, bits: 8, granularity: tap}\n"
    )
    r = run("train.py", "--arch", str(arch_file), "--epochs", "1", "--outDir", str(out), *TINY)
    assert r.returncode == 0, r.stderr
    assert "F(2x2,3x3)" in r.stdout and (out / "synthetic_mixed_arch_w0.125_seed0").is_dir()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--arch", "missing.yaml"], "missing.yaml"),
        (["--Q", "--bits", "40"], "--bits 40"),
        (["--F", "5"], "--F"),
        (["--epochs", "0"], "--epochs"),
        (["--transform-lr", "-1"], "--transform-lr"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "--download"),
        (["--device", "cuda:7"], "--device"),
        (["--dataset", "synthetic", "--val-fraction", "1.5"], "--val-fraction"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(args, needle, tmp_path):
    r = run("train.py", *args, "--outDir", str(tmp_path))
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_adapt_requires_model_dir(tmp_path):
    r = run("adapt.py", "--flex", "--outDir", str(tmp_path))
    assert r.returncode == 2 and "--modelDir" in r.stderr


def test_train_a_user_model_at_another_input_size(tmp_path):
    # The new user's case: a factory in the working directory, images fitted to 28x28 and a
    # uniform static F4 that is not refused where layers are smaller than the tile.
    sys.path.insert(0, str(ROOT / "tests"))
    from test_discovery import VGG_SOURCE

    (tmp_path / "digits_net.py").write_text(VGG_SOURCE)
    args = ["--model", "digits_net:make_vgg", "--static", "--F", "4", "--input-size", "28"]
    r = run("train.py", *args, "--epochs", "1", "--outDir", "runs", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resized to 28x28" in r.stderr  # said once, by the data loader's log
    assert "total (end to end)" in r.stdout and "F(4x4,3x3)" in r.stdout
    run_dir = tmp_path / "runs" / "synthetic_static_F4_fp32_make_vgg_28px_seed0"
    saved = (run_dir / "arch.yaml").read_text()
    assert "name: digits_net:make_vgg" in saved or "model: digits_net:make_vgg" in saved
    assert "input_size: 28" in saved
    r = run("train.py", "--arch", str(run_dir / "arch.yaml"), "--epochs", "1", "--outDir", "runs",
            "--run-name", "again", *TINY, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "resnet99"], "--model: 'resnet99' is not a model reference"),
        (["--model", "torchvision:resnet18", "--mult", "0.5"], "--mult applies only"),
        (["--arch", "a.yaml", "--model", "torchvision:resnet18"], "--model conflicts with --arch"),
        (["--model", "no_pkg_xyz.nets:make", "--dataset", "synthetic"], "cannot import"),
        (["--arch", "a.yaml", "--input-size", "28"], "--input-size 28 conflicts with --arch"),
    ],
)
def test_bad_model_flags_give_one_line(args, needle, tmp_path):
    (tmp_path / "a.yaml").write_text("width: 0.125\n")
    r = run("train.py", *args, "--outDir", "runs", "--limit-train", "50", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()  # nothing written
