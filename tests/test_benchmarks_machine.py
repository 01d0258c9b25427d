"""Every benchmark names the machine its figures were measured on (the ISA torch dispatches to,
threads, ...) above its table and in its JSON line; benchmarks/gpu_check.sh refuses, in one
line, a machine without CUDA."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from benchmark_module import ROOT, load_benchmark

ISA = torch.backends.cpu.get_cpu_capability()


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The benchmarks set torch's threads: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _machine_first(out: str, *, threads: int) -> tuple[str, dict]:
    """The machine line, checked to come before any figure, and the final JSON line."""
    lines = out.strip().splitlines()
    machine = next(i for i, line in enumerate(lines) if line.startswith("# machine: "))
    text = lines[machine].removeprefix("# machine: ")
    assert f"ISA {ISA}," in text and f", {threads} threads," in text
    assert "load average" in text and f"torch {torch.__version__.split('+')[0]}" in text
    summary = json.loads(lines[-1])
    assert text.startswith(summary["machine"])  # the same line (the table's adds a load note)
    return text, {"lines": lines, "index": machine, "summary": summary}


def test_kernels_prints_the_machine_above_its_table(capsys):
    kernels = load_benchmark("kernels")
    args = ["--widths", "0.5", "--batches", "1", "--tiles", "2", "--repeats", "1"]
    assert kernels.main(args) == 0
    _text, got = _machine_first(capsys.readouterr().out, threads=1)
    header = next(i for i, line in enumerate(got["lines"]) if "conv2d ms" in line)
    assert got["index"] < header
    assert got["summary"]["rows"]  # figures were measured


def test_kernels_times_the_int8_kernels_against_int8_direct(capsys):
    from wasearch.deploy import int8_available

    kernels = load_benchmark("kernels")
    args = ["--bits", "8", "--widths", "0.5", "--batches", "1", "--tiles", "4", "--repeats", "1"]
    if not int8_available():
        assert kernels.main(args) == 2  # refused in one line, not timed as float
        assert "no int8" in capsys.readouterr().err
        return
    assert kernels.main(args) == 0
    _text, got = _machine_first(capsys.readouterr().out, threads=1)
    summary = got["summary"]
    assert summary["bits"] == "8"
    assert set(summary["f4_target_met"]) == {"1"}  # one summary per batch size
    rows = summary["rows"]
    assert rows and all(
        "F4_ratio" in r and "conv2d_nchw_s" not in r for r in rows if r["size"] >= 4
    )
    assert all(r["F4_relerr"] < 1.0 for r in rows if "F4_relerr" in r)  # a convolution, roughly


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_kernels_on_a_missing_gpu_is_refused(capsys):
    assert load_benchmark("kernels").main(["--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_search_cost_prints_the_machine_above_its_rows(monkeypatch, capsys):
    """Training replaced by stand-ins (the real thing takes minutes): what is printed."""
    import wasearch.engine
    import wasearch.models
    import wasearch.search.base

    def fake_fit(model, data, config, *, on_epoch=None, **_kw):
        time.sleep(0.02)  # the figures are rounded to 0.01 s, and divided by
        if on_epoch is not None:  # from scratch: reaches the adapted accuracy in one epoch
            on_epoch({"val_acc": 0.6, "epoch": 1})
        return SimpleNamespace(best_val_acc=0.5, val_images=200)

    monkeypatch.setattr(wasearch.engine, "fit", fake_fit)
    monkeypatch.setattr(wasearch.models, "build", lambda arch: None)
    monkeypatch.setattr(wasearch.search.base, "ensure_base", lambda *a, **k: "base")
    monkeypatch.setattr(wasearch.search.base, "load_space_data", lambda space: None)
    space = str(ROOT / "spaces" / "quick.yaml")
    assert load_benchmark("search_cost").main([space, "--threads", "1"]) == 0
    _text, got = _machine_first(capsys.readouterr().out, threads=1)
    first_row = next(i for i, line in enumerate(got["lines"]) if "adapted" in line)
    assert got["index"] < first_row
    assert got["summary"]["trials"] == 5  # quick.yaml's reference architectures


def test_nas_compare_prints_the_machine_above_its_table(monkeypatch, capsys, tmp_path):
    """The searches replaced by stand-in studies (the real ones take many minutes)."""
    nas = load_benchmark("nas_compare")
    monkeypatch.setattr(nas, "subprocess", SimpleNamespace(run=lambda *a, **k: None))
    monkeypatch.setattr(nas, "shutil", SimpleNamespace(copytree=lambda *a, **k: None))
    monkeypatch.setattr(nas, "_run", lambda space, results: 1.0)
    import wasearch.search.base

    monkeypatch.setattr(wasearch.search.base, "default_threads", lambda workers=1: 3)
    optuna_trials = [
        SimpleNamespace(values=[acc], user_attrs={"latency_ms": lat, "train_seconds": 10.0})
        for lat, acc in ((1.0, 0.5), (2.0, 0.7))
    ]
    dnas_trials = [
        SimpleNamespace(
            values=[0.65],
            user_attrs={
                "source": "differentiable",
                "lambda": 0.1,
                "latency_ms": 1.5,
                "train_seconds": 2.0,
                "val_acc": 0.65,
                "val_images": 200,
                "arch_summary": "F4-flex/8 x16",
            },
        )
    ]
    monkeypatch.setattr(
        nas, "_load", lambda results, name: optuna_trials if name == "quick" else dnas_trials
    )
    assert nas.main(["--out", str(tmp_path)]) == 0
    _text, got = _machine_first(capsys.readouterr().out, threads=3)
    header = next(i for i, line in enumerate(got["lines"]) if "Optuna front acc" in line)
    assert got["index"] < header
    assert got["summary"]["points"][0]["gap_points"] == pytest.approx(0.0 - (0.65 - 0.5) * 100)


def test_the_header_functions_name_this_machine(monkeypatch):
    import wasearch.search.base

    kernels = load_benchmark("kernels")
    assert kernels.machine_header("cpu: X, ISA Y", load=0.0) == "# machine: cpu: X, ISA Y"
    assert "shared" in kernels.machine_header("cpu: X, ISA Y", load=2.0)
    monkeypatch.setattr(wasearch.search.base, "default_threads", lambda workers=1: 3)
    nas = load_benchmark("nas_compare").machine_header()
    assert nas.startswith("# machine: ") and f"ISA {ISA}, " in nas and ", 3 threads," in nas


# -- benchmarks/gpu_check.sh ----------------------------------------------------------------

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_is_an_executable_bash_script():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_without_cuda_exits_2_in_one_line(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    env.pop("PYTHON", None)
    got = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120
    )
    assert got.returncode == 2
    lines = (got.stdout + got.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA: ")
    assert not Path(tmp_path / "out").exists()  # nothing written


# -- benchmarks/train_step.py ---------------------------------------------------------------


def test_train_step_interleaves_configurations_and_pairs_their_ratios():
    """A tiny run end to end: the machine above the table, every configuration stepped once
    per round in a rotating order, and ratios taken within rounds."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "train_step.py"),
            "--configs", "normal8", "static4",
            "--width", "0.125", "--batch", "2", "--steps", "3", "--warmup", "1",
            "--threads", "1",
        ],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    _text, got = _machine_first(out, threads=1)
    summary = got["summary"]
    assert summary["rounds"] == 3
    res = summary["results"]
    assert set(res) == {"normal8", "static4"}
    assert all(len(r["step_times_s"]) == 3 for r in res.values())
    ratios = sorted(
        s / b
        for s, b in zip(
            res["static4"]["step_times_s"], res["normal8"]["step_times_s"], strict=True
        )
    )
    assert res["static4"]["time_vs_normal8"] == pytest.approx(ratios[1])  # median of three
    assert res["normal8"]["time_vs_normal8"] == 1.0
    assert all(r["peak_rss_mib"] > r["rss_before_steps_mib"] * 0.5 for r in res.values())
    # each child reports the settings it ran with: here this process's, and the allocator set
    # as the scripts set it
    from wasearch import allocator

    mine = {k: os.environ.get(k) for k in load_benchmark("train_step").REPORTED_ENV}
    why = allocator._why_not(os.environ) or ("not glibc" if allocator._libc() is None else None)
    mine["allocator"] = f"as it was: {why}" if why else "glibc: heap, freed memory kept"
    assert all(r["env"] == mine for r in res.values())


@pytest.mark.parametrize(
    "flag, value", [("--threads", "0"), ("--batch", "0"), ("--width", "0"), ("--steps", "0")]
)
def test_train_step_refuses_a_bad_flag_in_one_line(flag, value):
    got = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), flag, value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert got.returncode == 2 and got.stdout == ""
    last = got.stderr.strip().splitlines()[-1]
    assert last.startswith("train_step.py: error:") and flag in last
    assert "Traceback" not in got.stderr


def test_train_step_tap_configurations_build_the_spaces_quantizers():
    """``_tap`` configurations measure the shipped CIFAR spaces' layers (per-tap ranges and
    transform scales); the others the paper's (per tensor), and the default run only those."""
    train_step = load_benchmark("train_step")
    tap = [c for _, c in train_step.arch_of("flex4_tap", None, 0.5).layers]
    paper = [c for _, c in train_step.arch_of("flex4", None, 0.5).layers]
    assert len(tap) == 16 and all(
        (c.conv, c.tile, c.bits, c.granularity, c.transforms) == ("flex", 4, 8, "tap", "tap")
        for c in tap
    )
    assert all((c.granularity, c.transforms) == ("tensor", "tensor") for c in paper)
    assert not any(name.endswith("_tap") for name in train_step.DEFAULT_CONFIGS)


def test_train_step_variants_change_only_their_environment():
    """``--thp``, ``--torch-ops`` and ``--glibc-malloc`` run each configuration again with one
    setting changed
    (the children report what they ran with: see the end-to-end test above)."""
    train_step = load_benchmark("train_step")
    base = {"PATH": "/bin", "THP_MEM_ALLOC_ENABLE": "0"}
    assert train_step.child_env("flex4", base) == base
    assert train_step.child_env("flex4/thp", base) == {**base, "THP_MEM_ALLOC_ENABLE": "1"}
    assert train_step.child_env("flex4/torch-ops", base) == {
        **base,
        "WASEARCH_FUSED_KERNELS": "0",
    }
    assert train_step.child_env("flex4/glibc-malloc", base) == {**base, "WASEARCH_MALLOC": "glibc"}
    assert train_step._label("flex4/thp") == "flex F4 8-bit (huge pages)"
    assert train_step._split("normal8/torch-ops") == ("normal8", "/torch-ops")


def test_train_step_rotates_the_order_of_each_round():
    train_step = load_benchmark("train_step")
    order = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def ask(self, command):
            order.append(self.name)
            return {"step_s": 1.0}

    times = train_step.interleave([Fake("a"), Fake("b"), Fake("c")], 3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert times == {"a": [1.0] * 3, "b": [1.0] * 3, "c": [1.0] * 3}
    ratio = train_step.paired_ratio([2.0, 3.0, 9.0], [1.0, 1.0, 1.0])
    assert ratio == {"median": 3.0, "q25": 2.5, "q75": 6.0}


# -- the CPU's identity --------------------------------------------------------------------------

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: {family}
model\t\t: {model}
model name\t: AMD EPYC
flags\t\t: fpu avx512f

processor\t: 1
cpu family\t: 99
model\t\t: 99
model name\t: Other
"""


def test_a_generic_cpu_name_is_told_apart_by_family_and_model(monkeypatch):
    """Two virtual machines both named "AMD EPYC" (a Zen 4 and a Zen 5) get two identities,
    read from the first processor's block; without the numbers, the name alone."""
    from wasearch.latency import timing

    zen4 = timing.cpu_model(CPUINFO.format(family=25, model=17))
    zen5 = timing.cpu_model(CPUINFO.format(family=26, model=2))
    assert zen4 == "AMD EPYC (family 25, model 17)" and zen5 == "AMD EPYC (family 26, model 2)"
    assert timing.cpu_model("model name\t: Some CPU\n") == "Some CPU"
    monkeypatch.setattr(timing, "cpu_model", lambda: zen4)
    assert timing.device_identity("cpu")["device"] == f"cpu: {zen4}"
    assert timing.device_slug("cpu", threads=2) == "cpu-amd-epyc-f25m17-2t"
    long = "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz with a long name (family 6, model 143)"
    monkeypatch.setattr(timing, "cpu_model", lambda: long)
    assert timing.device_slug("cpu", threads=1).endswith("-f6m143-1t")  # kept past the cut


def test_a_table_timed_on_another_cpu_of_the_same_name_is_refused(monkeypatch, tmp_path):
    """A measured table keeps the CPU it was timed on; a machine of the same model name but
    another family or model does not extend it silently (the error names both)."""
    from wasearch.latency import LatencyError, timing
    from wasearch.latency.measure import MeasuredModel

    path = tmp_path / "t.csv"
    path.write_text(
        "op,in_channels,out_channels,height,width,batch,conv,tile,bits,seconds,device,threads\n"
        'relu,8,8,4,4,1,,,fp32,1e-06,"cpu: AMD EPYC (family 26, model 2)",1\n'
    )
    monkeypatch.setattr(timing, "cpu_model", lambda: "AMD EPYC (family 25, model 17)")
    with pytest.raises(LatencyError, match=r"family 26, model 2.*family 25, model 17"):
        MeasuredModel(path, threads=1)
    monkeypatch.setattr(timing, "cpu_model", lambda: "AMD EPYC (family 26, model 2)")
    MeasuredModel(path, threads=1)  # the same machine: the table is its own
