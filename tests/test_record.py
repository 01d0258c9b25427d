"""The trial record: the Pareto front's rules, the user attributes against docs/study_format.md,
and the train.py commands printed for a trial."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from wasearch.fileio import display_path
from wasearch.search import RunOptions, load_space, record, run_search
from wasearch.search.base import ensure_base, load_space_data
from wasearch.search.testing import study_at, tiny_space, write_space

REPO = Path(__file__).resolve().parents[1]


def _trial(number: int, acc: float, lat: float, *, feasible: bool = True, state=None):
    attrs = {"val_acc": acc, "latency_ms": lat, "feasible": feasible}
    t = optuna.trial.create_trial(
        state=state or TrialState.COMPLETE,
        values=[acc, lat] if (state or TrialState.COMPLETE) == TrialState.COMPLETE else None,
        params={"u": "a"},
        distributions={"u": CategoricalDistribution(["a"])},
        user_attrs=attrs,
    )
    t.number = number
    return t


# ---------------------------------------------------------------------------------------------
# pareto_front


def test_ties_keep_only_the_first_of_identical_points():
    values = [[0.9, 2.0], [0.8, 1.0], [0.9, 2.0], [0.8, 1.0]]
    assert record.pareto_front(values, [True, False]) == [0, 1]


def test_all_infeasible_front_is_empty():
    values = [[0.9, 2.0], [0.8, 1.0]]
    assert record.pareto_front(values, [True, False], feasible=[False, False]) == []
    # Only the feasible rows compete: a better infeasible row does not hide them.
    assert record.pareto_front(values + [[0.95, 0.5]], [True, False], [1, 1, 0]) == [0, 1]
    trials = [_trial(0, 0.9, 2.0, feasible=False), _trial(1, 0.8, 1.0, feasible=False)]
    assert record.front_trials(trials, ["accuracy", "latency_ms"]) == []
    everyone = record.front_trials(trials, ["accuracy", "latency_ms"], feasible_only=False)
    assert [t.number for t in everyone] == [0, 1]


def test_dominance_with_mixed_directions():
    values = [[0.9, 2.0], [0.8, 1.0], [0.85, 2.5], [0.7, 1.0], [0.9, 1.5]]
    # Accuracy up, latency down: 0 is beaten by 4 (same accuracy, faster), 2 by 0 and 4, 3 by 1.
    assert record.pareto_front(values, [True, False]) == [1, 4]
    # The other way round the answer changes: the slow, inaccurate points win.
    assert record.pareto_front(values, [False, True]) == [2, 3]
    # Three axes: a point best on the third axis joins the front.
    three = [v + [p] for v, p in zip(values, [5, 5, 1, 5, 5], strict=True)]
    assert record.pareto_front(three, [True, False, False]) == [1, 2, 4]


def test_missing_or_non_finite_values_never_make_the_front():
    values = [[math.nan, 0.1], [0.5, None], [0.4, 1.0], [math.inf, 0.1]]
    assert record.pareto_front(values, [True, False]) == [2]
    assert record.pareto_front([], [True, False]) == []


def test_front_trials_keeps_the_earliest_trial_in_any_order():
    trials = [_trial(5, 0.9, 1.0), _trial(2, 0.9, 1.0), _trial(3, 0.5, 3.0)]
    trials.append(_trial(4, 0.99, 9.0, state=TrialState.FAIL))
    assert [t.number for t in record.front_trials(trials, ["accuracy", "latency_ms"])] == [2]
    # Scalarized studies take the front over accuracy and latency.
    assert [t.number for t in record.front_trials(trials, ["score"])] == [2]


# ---------------------------------------------------------------------------------------------
# The user attributes against the contract


def _documented_trial_keys() -> set[str]:
    text = (REPO / "docs" / "study_format.md").read_text()
    section = text.split("Trial user attributes", 1)[1].split("\n\n", 2)[1]
    keys = set()
    for line in section.splitlines():
        if m := re.match(r"\| `([a-z_]+)` \|", line):
            keys.add(m.group(1))
        keys.update(re.findall(r"`([a-z_]+)` when computed", line))
    return keys


def test_every_attribute_the_record_builds_is_documented():
    from wasearch.arch import Arch

    arch = Arch.uniform("normal", None, 8, width=0.125, num_classes=10, input_size=32)

    class Priced:
        total, layers, any_estimated = 0.002, {"layer1.0.conv1": 0.0001}, False

    frozen = _trial(0, 0.5, 1.0)
    built = {
        **record.start_attrs("optuna"),
        **record.reference_attrs("all-normal"),
        **record.arch_attrs(arch, params=10),
        **record.latency_attrs(Priced(), limit_ms=None),
        **record.fit_attrs(0.5, seconds=1.0, history=[], val_images=400),
        **record.pruned_attrs(1, 0.5, [], val_images=400),
        **record.skipped_attrs("duplicate of trial 0"),
        **record.untried_attrs(3),
        **record.fail_attrs("x" * 900),
        **record.retry_attrs(frozen),
        **record.differentiable_attrs(
            lam=0.5, supernet_seconds=1.0, probabilities=[], checkpoint=Path("c")
        ),
    }
    assert set(built) == _documented_trial_keys()
    assert built["val_images"] == 400 and built["val_se"] == pytest.approx(0.025)
    assert len(built["fail_reason"]) == record.MAX_REASON
    assert built["bitops"] == record.bitops(arch)


@pytest.fixture(scope="module")
def one_trial(tmp_path_factory):
    """A one-trial search of the tiny space (its base trained here)."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("record")
    space = load_space(write_space(root / "tiny.yaml", tiny_space(budget={"trials": 1})))
    study_dir = root / "results" / "tiny"
    ensure_base(
        space, study_dir, data=lambda: load_space_data(space), device="cpu", progress=False
    )
    options = RunOptions(threads=1, report=False, results=str(root / "results"))
    assert run_search(space, options, progress=False).done == 1
    return study_at(root, "tiny")


def test_the_workers_attributes_match_the_contract(one_trial):
    done = [t for t in one_trial.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 1
    attrs = done[0].user_attrs
    documented = _documented_trial_keys()
    assert set(attrs) <= documented, set(attrs) - documented
    complete = {
        "arch", "arch_summary", "latency_ms", "layer_latency_ms", "latency_estimated", "params",
        "bitops", "val_acc", "train_seconds", "feasible", "source", "history", "worker",
    }  # fmt: skip
    assert complete <= set(attrs), complete - set(attrs)
    assert attrs["source"] == "optuna"
    assert done[0].values == pytest.approx([attrs["val_acc"], attrs["latency_ms"]])
    # The noise of the accuracy, for any client of the study: n and the binomial error.
    n = attrs["val_images"]
    assert isinstance(n, int) and n > 0
    assert attrs["val_se"] == pytest.approx(
        math.sqrt(attrs["val_acc"] * (1 - attrs["val_acc"]) / n)
    )


# ---------------------------------------------------------------------------------------------
# The pick


def _noisy(number, acc, lat, *, n=5000, reference=None, feasible=True):
    t = _trial(number, acc, lat, feasible=feasible)
    t.user_attrs.update(record.noise_attrs(acc, n))
    if reference:
        t.user_attrs["reference"] = reference
    return t


def test_noise_pick_takes_the_faster_of_two_points_the_noise_cannot_tell_apart():
    trials = [
        _noisy(0, 0.690, 5.00, reference="all-normal"),
        _noisy(1, 0.6672, 3.27, reference="static-F4"),
        _noisy(2, 0.6680, 3.95),  # 0.08 point more than trial 1, 0.68 ms slower
        _noisy(3, 0.600, 2.00),
        _noisy(4, 0.699, 1.00, feasible=False),  # never the pick
    ]
    objectives = ["accuracy", "latency_ms"]
    picked = record.noise_pick(trials, objectives)
    # The best is all-normal (69 %): 2.3 points above trial 2, far outside the noise.
    assert picked.best.number == 0 and picked.pick.number == 0 and picked.within == 1
    assert picked.reference.number == 0 and picked.reference_pick.number == 0
    # Without all-normal, trials 1 and 2 are the same within one standard error: the faster.
    picked = record.noise_pick(trials[1:], objectives)
    assert picked.best.number == 2 and picked.pick.number == 1 and picked.within == 2
    assert picked.cost == "latency_ms" and picked.reference is None
    # At tolerance 0 only the best itself is within it.
    assert record.noise_pick(trials[1:], objectives, tolerance=0).pick.number == 2
    # An accuracy-only study has nothing to be cheaper in: the most accurate trial.
    for t in trials:
        del t.user_attrs["latency_ms"]
    assert record.noise_pick(trials[1:], ["accuracy"]).pick.number == 2
    assert record.noise_pick([], objectives) is None


def test_report_tolerance_reads_the_stored_space():
    assert record.report_tolerance({"report": {"tolerance": 2}}) == 2.0
    assert record.report_tolerance({"name": "old"}) == 1.0
    assert record.report_tolerance(None) == 1.0


def test_the_study_names_its_objectives(one_trial):
    assert one_trial.metric_names == ["accuracy", "latency_ms"]
    assert one_trial.user_attrs["objectives"] == ["accuracy", "latency_ms"]


# ---------------------------------------------------------------------------------------------
# The train.py commands


def test_a_command_with_a_space_in_a_path_splits_back_into_the_right_argv(tmp_path):
    folder = tmp_path / "my results" / "it's here"
    arch = folder / "pareto" / "trial_3.yaml"
    ckpt = folder / "trials" / "3" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    raw = tiny_space(data={"data_dir": "~/my data"})
    full, tune = record.train_commands(raw, arch, "tiny", 3, ckpt)
    argv = shlex.split(full)
    assert argv[:2] == ["python", "train.py"]
    assert argv[argv.index("--arch") + 1] == display_path(arch)
    assert argv[argv.index("--data-dir") + 1] == "~/my data"
    assert argv[argv.index("--run-name") + 1] == "tiny_trial_3"
    argv = shlex.split(tune)
    assert argv[argv.index("--modelDir") + 1] == display_path(ckpt.parent)
    assert record.train_command(raw, arch, "tiny", 3) == full
