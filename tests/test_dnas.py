import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wasearch.arch import Arch, LayerChoice
from wasearch.data import load_dataset
from wasearch.dnas import MixedConv, Supernet, differentiable_search, expected_latency
from wasearch.engine import TrainConfig, fit
from wasearch.models import build, make_conv

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 0.125
CANDIDATES = [
    LayerChoice("normal", None, 8),
    LayerChoice("static", 2, 8),
    LayerChoice("flex", 4, 8),
]


def fake_cost(spec, choice):
    """Made-up latency: Winograd cheaper, larger tiles cheaper (enough to test the gradient)."""
    macs = spec.in_channels * spec.out_channels * spec.height * spec.width * 9
    factor = {None: 1.0, 2: 0.5, 4: 0.3, 6: 0.25}[choice.tile]
    return macs * factor * 1e-11


@pytest.mark.parametrize("index", range(len(CANDIDATES)))
def test_mixed_layer_with_fixed_choice_equals_the_single_layer(index):
    torch.manual_seed(0)
    mixed = MixedConv(4, 6, CANDIDATES)
    single = make_conv(4, 6, CANDIDATES[index])
    single.load_state_dict(mixed.ops[index].state_dict())
    mixed.fix(index)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(mixed(x), single(x))
    # every candidate shares one weight tensor
    assert all(op.weight is mixed.weight for op in mixed.ops)


def _saved_bytes(model, x, y):
    """Bytes autograd keeps for the backward pass of one step: the step's activation memory."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return total


def test_supernet_step_memory_near_a_single_network():
    torch.manual_seed(0)
    base = Arch.uniform("normal", bits=8, width=WIDTH)
    names = base.layer_names
    supernet = Supernet(base, {n: CANDIDATES for n in names})
    supernet.train()
    supernet.set_sampling(True)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    super_bytes = max(_saved_bytes(supernet, x, y) for _ in range(3))
    single = max(
        _saved_bytes(build(Arch.uniform(c.conv, c.tile, c.bits, width=WIDTH)).train(), x, y)
        for c in CANDIDATES
    )
    assert super_bytes <= 1.5 * single, (super_bytes, single)


def test_expected_latency_is_differentiable_and_lambda_moves_logits_to_cheaper():
    base = Arch.uniform("normal", bits=8, width=WIDTH)
    supernet = Supernet(base, {n: CANDIDATES for n in base.layer_names})
    specs = supernet.specs
    costs = {n: torch.tensor([fake_cost(specs[n], c) for c in CANDIDATES]) for n in supernet.mixed}
    lat = expected_latency(supernet, costs)
    lat.backward()
    g = supernet.mixed["layer1.0.conv1"].logits.grad
    assert g is not None and g[0] > 0 > g[2]  # raising the normal logit costs latency
    opt = torch.optim.SGD(supernet.arch_parameters(), lr=1.0)
    for _ in range(5):
        opt.zero_grad()
        (10.0 * expected_latency(supernet, costs) / lat.detach()).backward()
        opt.step()
    p = supernet.mixed["layer1.0.conv1"].probabilities()
    assert p[2] > p[1] > p[0]


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    data = load_dataset("synthetic", limit_train=400, limit_test=100, val_fraction=0.03)
    out = tmp_path_factory.mktemp("base")
    fit(
        build(Arch.uniform("normal", bits=8, width=WIDTH)),
        data,
        TrainConfig(epochs=1, batch_size=32),
        out_dir=out,
        progress=False,
    )
    return out / "best.pt", data


@pytest.mark.slow
def test_tiny_differentiable_search_end_to_end_and_train_arch(base_ckpt, tmp_path):
    ckpt, data = base_ckpt
    names = Arch.uniform("normal", width=WIDTH).layer_names
    results = {}
    for lam in (0.0, 20.0):
        results[lam] = differentiable_search(
            str(ckpt),
            data,
            {n: CANDIDATES for n in names},
            fake_cost,
            lam=lam,
            epochs=2,
            warmup_epochs=1,
            batch_size=32,
            max_batches_per_epoch=6,
            arch_lr=0.05,
        )
    assert len(results[20.0].probabilities) == 2
    assert results[20.0].expected_latency_s <= results[0.0].expected_latency_s
    arch_file = results[20.0].arch.save(tmp_path / "dnas.yaml")
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--arch",
            str(arch_file),
            "--epochs",
            "1",
            "--dataset",
            "synthetic",
            "--limit-train",
            "200",
            "--limit-test",
            "50",
            "--val-fraction",
            "0.02",
            "--outDir",
            str(tmp_path / "runs"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_differentiable_strategy_through_search_py_and_export(tmp_path):
    import optuna

    from wasearch.search.testing import tiny_space, write_space

    space = tiny_space(
        name="dtiny",
        strategy={
            "name": "differentiable",
            "lambdas": [0.0, 5.0],
            "epochs": 2,
            "warmup_epochs": 1,
            "arch_lr": 0.05,
        },
    )
    path = write_space(tmp_path / "dtiny.yaml", space)
    cmd = [
        sys.executable,
        str(ROOT / "search.py"),
        "run",
        str(path),
        "--results",
        str(tmp_path / "results"),
        "--no-progress",
        "--threads",
        "1",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(
        study_name="dtiny", storage=f"sqlite:///{tmp_path / 'results' / 'dtiny' / 'study.db'}"
    )
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    dnas = [t for t in done if t.user_attrs.get("source") == "differentiable"]
    assert sorted(t.user_attrs["lambda"] for t in dnas) == [0.0, 5.0]
    assert any(t.user_attrs.get("reference") == "all-normal" for t in done)
    for t in dnas:
        assert len(t.user_attrs["probabilities"]) == 2
        assert t.values[1] == pytest.approx(t.user_attrs["latency_ms"])
        Arch.from_yaml(t.user_attrs["arch"])
    # Rerunning finds the study finished and searches nothing again.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0 and "finished" in (again.stdout + again.stderr)
    assert len(optuna.load_study(study_name="dtiny", storage=study._storage).trials) == len(
        study.trials
    )
    # Its result trains with train.py --arch.
    number = dnas[-1].number
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "search.py"),
            "export",
            str(tmp_path / "results" / "dtiny"),
            "--trial",
            str(number),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    arch_file = tmp_path / "results" / "dtiny" / "pareto" / f"trial_{number}.yaml"
    # The exported file is the architecture the study recorded for that trial: the argmax of the
    # supernet's last recorded probabilities, in the space, with its real accuracy in the header.
    import json
    import math

    from wasearch.search import load_space

    recorded = dnas[-1]
    exported = Arch.load(arch_file)
    assert exported == Arch.from_yaml(recorded.user_attrs["arch"])
    assert exported.summary() == recorded.user_attrs["arch_summary"]
    last_probs = recorded.user_attrs["probabilities"][-1]
    assert sorted(last_probs) == sorted(exported.layer_names)
    for layer, probs in last_probs.items():
        assert probs[exported.choice(layer).label] == max(probs.values()), layer
    assert recorded.params == (load_space(path).params_of(exported) or {})
    acc = recorded.user_attrs["val_acc"]
    assert isinstance(acc, float) and math.isfinite(acc) and 0.0 <= acc <= 1.0
    assert recorded.values == [acc, recorded.user_attrs["latency_ms"]]  # accuracy, latency
    assert f"# val acc {acc:.4f} after the search's fine-tuning" in arch_file.read_text()
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--arch",
            str(arch_file),
            "--epochs",
            "1",
            "--dataset",
            "synthetic",
            "--limit-train",
            "100",
            "--limit-test",
            "50",
            "--val-fraction",
            "0.02",
            "--outDir",
            str(tmp_path / "runs"),
            "--run-name",
            "exported",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    final = json.loads((tmp_path / "runs" / "exported" / "final.json").read_text())
    assert final["arch"] == exported.summary()
    assert 0.0 <= final["best_val_acc"] <= 1.0 and 0.0 <= final["test_acc"] <= 1.0
