"""train.py / adapt.py / search.py as a new user meets them: errors before output, honest figures.

In-process (``run_main`` with an argv) on the synthetic set, tiny widths and one-batch epochs.
"""

import argparse
import functools

import pytest
import torch

from wasearch import engine
from wasearch.arch import Arch
from wasearch.cli import run_main
from wasearch.data import load_dataset
from wasearch.engine import TrainConfig, fit
from wasearch.models import build
from wasearch.search import cli as search_cli
from wasearch.train_cli import build_parser, main

WIDTH = 0.125
TINY = [
    "--dataset",
    "synthetic",
    "--limit-train",
    "64",
    "--limit-test",
    "32",
    "--val-fraction",
    "0.01",
    "--batch_size",
    "32",
    "--epochs",
    "1",
    "--use_cpu",
    "--no-progress",
]


def _help(parser: argparse.ArgumentParser, flag: str) -> str:
    return next(a.help for a in parser._actions if flag in a.option_strings)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A normal 8-bit run at width 0.125 trained on one batch: what adapt.py starts from."""
    out = tmp_path_factory.mktemp("base")
    data = load_dataset("synthetic", limit_train=64, limit_test=32, val_fraction=0.01)
    torch.manual_seed(0)
    model = build(Arch.uniform("normal", bits=8, width=WIDTH))
    fit(model, data, TrainConfig(epochs=1, max_batches_per_epoch=1), out_dir=out, progress=False)
    return out


def _adapt(argv, capsys):
    code = run_main(functools.partial(main, prog="adapt.py", adapt=True), argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_adapt_with_another_width_fails_before_the_summary_and_writes_nothing(
    base, tmp_path, capsys
):
    out = tmp_path / "runs"
    argv = ["--modelDir", str(base), "--flex", "--Q", "--mult", "0.25", "--outDir", str(out)]
    code, stdout, stderr = _adapt([*argv, *TINY], capsys)
    assert code == 2
    assert "width" in stderr and "--mult 0.125" in stderr
    assert "layer4.1.conv2" not in stdout and "run folder" not in stdout  # no summary printed
    assert not out.exists()  # no run folder left behind


def test_adapt_from_a_checkpoint_missing_weights_writes_nothing(base, tmp_path, capsys):
    payload = torch.load(base / "best.pt", weights_only=True)
    del payload["model"]["layer2.0.conv1.weight"]
    broken = tmp_path / "broken"
    broken.mkdir()
    torch.save(payload, broken / "best.pt")
    out = tmp_path / "runs"
    argv = ["--modelDir", str(broken), "--flex", "--Q", "--mult", str(WIDTH), "--outDir", str(out)]
    code, stdout, stderr = _adapt([*argv, *TINY], capsys)
    assert code == 2
    assert "layer2.0.conv1.weight" in stderr and "Traceback" not in stderr
    assert "layer4.1.conv2" not in stdout
    assert not out.exists()


def test_adapt_that_fits_still_trains(base, tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["--modelDir", str(base), "--static", "--F", "2", "--mult", str(WIDTH)]
    code, stdout, stderr = _adapt([*argv, "--outDir", str(out), *TINY], capsys)
    assert code == 0, stderr
    assert "initialized from" in stdout
    assert (out / "adapt_synthetic_static_F2_fp32_w0.125_seed0" / "best.pt").is_file()


class _Bar:
    """Stands in for tqdm: records what the progress bar would show."""

    def __init__(self) -> None:
        self.postfix: dict[str, str] = {}
        self.updates = 0

    def update(self, n: int = 1) -> None:
        self.updates += n

    def set_postfix(self, refresh: bool = True, **values: str) -> None:
        self.postfix = values

    def close(self) -> None:
        pass


def test_progress_bar_shows_the_running_mean_of_the_epoch(monkeypatch):
    bars: list[_Bar] = []

    def progress(total: int, desc: str, enabled: bool) -> _Bar:
        bars.append(_Bar())
        return bars[-1]

    monkeypatch.setattr(engine, "_progress", progress)
    data = load_dataset("synthetic", limit_train=128, limit_test=32, val_fraction=0.01)
    torch.manual_seed(0)
    model = build(Arch.uniform("normal", bits=None, width=WIDTH))
    result = fit(model, data, TrainConfig(epochs=1, batch_size=32, augment=False), progress=True)
    (bar,) = bars
    assert bar.updates == 4
    row = result.history[0]
    # What the bar shows at the end of the epoch is the epoch's mean, not the first batch's.
    assert bar.postfix == {"loss": f"{row['train_loss']:.3f}", "acc": f"{row['train_acc']:.3f}"}


def test_limit_train_says_where_validation_comes_from(tmp_path, capsys):
    argv = ["--use_normal_conv", "--mult", str(WIDTH), "--outDir", str(tmp_path), *TINY]
    argv[argv.index("--val-fraction") + 1] = "0.1"
    assert run_main(main, argv) == 0
    stdout = capsys.readouterr().out
    # 10% of the 5,000 synthetic training images are held out before --limit-train applies.
    counts = next(line for line in stdout.splitlines() if line.startswith("train "))
    assert counts.startswith("train 64 (--limit-train 64), val 500 ")
    assert "held out of the full training set before --limit-train" in counts
    assert "test 32 (--limit-test 32)" in counts
    parser = build_parser()
    assert "validation" in _help(parser, "--limit-train")
    assert "--limit-train" in _help(parser, "--val-fraction")


def test_threads_help_says_it_uses_the_idle_cores():
    parser = argparse.ArgumentParser()
    search_cli.register(parser.add_subparsers())
    run = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = _help(run.choices["run"], "--threads")
    assert "idle" in text and "load average" in text
