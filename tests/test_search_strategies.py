"""Search strategies, the median pruner and latency constraints, each on a tiny offline space.

Every search here runs in-process through :func:`wasearch.search.run_search` on the 4-unit space
of :mod:`wasearch.search.testing` (synthetic data, 2 batches a trial), from one base trained for
the module.
"""

from __future__ import annotations

import itertools
import re

import optuna
import pytest
from optuna.trial import TrialState

from wasearch.arch import Arch
from wasearch.cli import UserError
from wasearch.latency import load_latency_model
from wasearch.search import RunOptions, load_space, parse_space, pretrain, run_search
from wasearch.search.testing import space_with_base, study_at, tiny_space, write_space

#: Every ``strategy.name`` the space parser accepts (checked against its error message below)
#: and the Optuna sampler each one must get (the differentiable sweep is not a sampler).
SAMPLERS = {
    "nsga2": optuna.samplers.NSGAIISampler,
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "gp": optuna.samplers.GPSampler,
    "differentiable": None,
}
#: Strategy options for a 5-trial run. TPE and GP leave their random start after 2 trials, so
#: their model-based phase runs too; on this 16-architecture space it re-proposes trained
#: architectures, and the worker's untried-architecture fallback keeps the run to its budget.
STRATEGY_OPTIONS = {
    "nsga2": {"population_size": 2},  # the third trial onwards is bred from the first two
    "tpe": {"n_startup_trials": 2},
    "random": {},
    "gp": {"n_startup_trials": 2},
    "differentiable": {"lambdas": [0.0], "epochs": 2, "warmup_epochs": 1, "arch_lr": 0.05},
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny space's base, trained once for the module; returns its study folder."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("base")
    space = load_space(write_space(root / "tiny.yaml", tiny_space()))
    options = RunOptions(threads=1, report=False, results=str(root / "results"))
    pretrain(space, options, progress=False)
    return root / "results" / "tiny"


@pytest.fixture
def spy(monkeypatch):
    """Records the sampler and pruner each study is created with, and the trials ``fit`` trains
    (by trial number), while calling the real functions."""
    import wasearch.engine as engine

    seen = {"sampler": None, "pruner": None, "trained": []}
    real_create, real_fit = optuna.create_study, engine.fit

    def create_study(*args, **kwargs):
        seen["sampler"], seen["pruner"] = kwargs.get("sampler"), kwargs.get("pruner")
        return real_create(*args, **kwargs)

    def fit(*args, extra=None, **kwargs):
        seen["trained"].append((extra or {}).get("trial"))
        return real_fit(*args, extra=extra, **kwargs)

    monkeypatch.setattr(optuna, "create_study", create_study)
    monkeypatch.setattr(engine, "fit", fit)
    return seen


def _run(tmp_path, base_dir, name, **changes):
    path = space_with_base(tmp_path, base_dir, name, **changes)
    space = load_space(path)
    events = []
    options = RunOptions(threads=1, report=False, results=str(tmp_path / "results"))
    result = run_search(space, options, on_event=events.append, progress=False)
    return space, result, study_at(tmp_path, name), events


def _assert_valid_arch(space, trial) -> Arch:
    """The trial's architecture is one the space allows, and its recorded attributes agree."""
    attrs = trial.user_attrs
    arch = Arch.from_yaml(attrs["arch"])
    assert arch.summary() == attrs["arch_summary"]
    assert sorted(arch.layer_names) == sorted(s.name for s in space.specs)
    for name, choice in space.fixed:
        assert arch.choice(name) == choice
    for unit in space.units:
        for layer in unit.layers:
            assert arch.choice(layer) in unit.options, (trial.number, layer, arch.choice(layer))
    if attrs["source"] == "optuna":  # Optuna's parameters rebuild exactly this architecture
        assert space.arch(trial.params, num_classes=arch.num_classes) == arch
    assert isinstance(attrs["val_acc"], float) and 0.0 <= attrs["val_acc"] <= 1.0
    assert trial.values == pytest.approx([attrs["val_acc"], attrs["latency_ms"]])
    return arch


# -- strategies ----------------------------------------------------------------------------------
def test_the_strategy_list_is_what_the_parser_accepts():
    with pytest.raises(UserError) as err:
        parse_space(tiny_space(strategy={"name": "no-such-sampler"}))
    allowed = re.search(r"is not one of (.*)$", str(err.value)).group(1)
    assert sorted(allowed.split(", ")) == sorted(SAMPLERS)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_strategy_completes_a_tiny_search_with_valid_architectures(
    tmp_path, base_dir, spy, name
):
    if name == "gp":
        pytest.importorskip(
            "scipy", reason="strategy gp needs the optional scipy (pip install scipy)"
        )
    strategy = {"name": name, **STRATEGY_OPTIONS[name]}
    space, result, study, events = _run(
        tmp_path, base_dir, f"s_{name}", strategy=strategy, budget={"trials": 5}
    )
    refs = [n for n, _ in space.references()]
    target = 1 + len(refs) if name == "differentiable" else 5  # one point per lambda
    assert result.status == "finished" and result.done == target, result.message
    assert study.user_attrs["sampler"] == name
    expected = SAMPLERS[name]
    if expected is not None:
        assert type(spy["sampler"]) is expected

    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == target and not [t for t in study.trials if t.state == TrialState.FAIL]
    archs = [_assert_valid_arch(space, t) for t in complete]
    assert len(set(archs)) == len(archs), "a duplicate proposal was trained again"
    assert sorted(t.user_attrs["reference"] for t in complete if "reference" in t.user_attrs) == (
        sorted(refs)
    )
    searched = [t for t in complete if "reference" not in t.user_attrs]
    assert len(searched) == target - len(refs)
    if name == "differentiable":
        assert [t.user_attrs["source"] for t in searched] == ["differentiable"]
        assert searched[0].user_attrs["lambda"] == 0.0
    else:
        assert {t.user_attrs["source"] for t in complete} == {"optuna"}
    assert sorted(e.number for e in events if e.state == "COMPLETE") == sorted(
        t.number for t in complete
    )


# -- the median pruner ---------------------------------------------------------------------------
def test_median_pruner_prunes_a_trial_below_the_median(tmp_path, base_dir, spy, monkeypatch):
    """The first trial reports 0.9 after epoch 1, the second 0.1 (below the median of the
    completed trials: pruned), the others 0.95 (above it: completed)."""
    import wasearch.engine as engine

    spied_fit = engine.fit
    forced: list[float] = []

    def fit(*args, on_epoch=None, **kwargs):
        acc = [0.9, 0.1][len(forced)] if len(forced) < 2 else 0.95
        forced.append(acc)

        def report(row):  # the real epoch's metrics, with the accuracy the test decides
            return on_epoch({**row, "val_acc": acc})

        return spied_fit(*args, on_epoch=report if on_epoch else None, **kwargs)

    monkeypatch.setattr(engine, "fit", fit)
    strategy = {"name": "tpe", "n_startup_trials": 1, "pruner": "median"}
    space, result, study, events = _run(
        tmp_path, base_dir, "pruned", objectives=["accuracy"], strategy=strategy,
        budget={"trials": 3},
    )  # fmt: skip
    assert isinstance(spy["pruner"], optuna.pruners.MedianPruner)
    assert result.status == "finished" and result.done == 3  # a pruned trial counts as done
    trained = [study.trials[n] for n in spy["trained"]]
    assert [t.state for t in trained] == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.COMPLETE,
    ]
    first, pruned, last = trained
    assert first.intermediate_values == {1: 0.9} and last.intermediate_values == {1: 0.95}

    attrs = pruned.user_attrs
    assert pruned.intermediate_values == {1: 0.1}
    assert attrs["pruned_epoch"] == 1 and attrs["val_acc"] == 0.1 and "skipped" not in attrs
    assert [row["val_acc"] for row in attrs["history"]] == [0.1]
    assert {"arch", "arch_summary", "latency_ms", "feasible"} <= set(attrs)
    assert Arch.from_yaml(attrs["arch"]).summary() == attrs["arch_summary"]
    assert "train_seconds" not in attrs
    assert pruned.number not in result.front
    (event,) = [e for e in events if e.number == pruned.number]
    assert event.state == "PRUNED" and event.reason == "pruned after epoch 1"
    assert event.val_acc == 0.1 and event.done == 2


def test_multi_objective_studies_are_never_pruned(tmp_path, base_dir, spy):
    _, result, study, _ = _run(tmp_path, base_dir, "nopruner", budget={"trials": 2})
    assert isinstance(spy["pruner"], optuna.pruners.NopPruner)
    assert result.done == 2 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert all(t.intermediate_values == {} for t in study.trials)


# -- latency constraints -------------------------------------------------------------------------
def _limit_with_half_feasible(space) -> float:
    """A latency limit halfway between the 8th and 9th cheapest of the space's 16 architectures."""
    model = load_latency_model(dict(space.latency))
    names = [u.name for u in space.units]
    prices = sorted(
        model.price(space.arch(dict(zip(names, combo, strict=True)), num_classes=10)).total * 1e3
        for combo in itertools.product(*(u.labels for u in space.units))
    )
    assert len(prices) == 16 and prices[7] < prices[8]
    return (prices[7] + prices[8]) / 2


@pytest.mark.parametrize("prune", [True, False], ids=["prune_infeasible", "train_infeasible"])
def test_latency_constraint_marks_and_prunes_infeasible_proposals(tmp_path, base_dir, spy, prune):
    limit = _limit_with_half_feasible(load_space(write_space(tmp_path / "t.yaml", tiny_space())))
    constraints = {"latency_ms": limit, "prune_infeasible": prune}
    space, result, study, events = _run(
        tmp_path, base_dir, "limited", constraints=constraints, budget={"trials": 3}
    )
    assert result.status == "finished" and result.done == 3, result.message
    assert study.user_attrs["constraints"] == constraints
    # a proposal identical to an earlier trial is skipped before it is priced
    priced = [t for t in study.trials if "duplicate" not in t.user_attrs.get("skipped", "")]
    for t in priced:
        latency = t.user_attrs["latency_ms"]
        assert t.user_attrs["feasible"] is (latency <= limit), (t.number, latency, limit)
        # the sampler sees latency - limit (<= 0: feasible) through Trial.set_constraint
        assert t.constraints == {"latency_ms": pytest.approx(latency - limit)}

    infeasible = [t for t in priced if not t.user_attrs["feasible"]]
    proposed = [t for t in infeasible if "reference" not in t.user_attrs]
    assert proposed, "the limit should rule out some proposals of this seed"
    trained = set(spy["trained"])
    if prune:
        for t in proposed:  # pruned before any training, and not counted as done
            assert t.state == TrialState.PRUNED and t.number not in trained
            assert t.user_attrs["skipped"].startswith(
                f"infeasible: latency {t.user_attrs['latency_ms']:.3f} ms > {limit:g} ms"
            )
            assert not (tmp_path / "results" / "limited" / "trials" / str(t.number)).exists()
            assert "val_acc" not in t.user_attrs and t.values is None
        assert not [e for e in events if e.number in {t.number for t in proposed}]
    else:
        for t in proposed:
            assert t.state == TrialState.COMPLETE and t.number in trained
            assert 0.0 <= t.user_attrs["val_acc"] <= 1.0
    # References are baselines: they are trained even when the limit rules them out.
    refs = [t for t in infeasible if "reference" in t.user_attrs]
    assert all(t.state == TrialState.COMPLETE and t.number in trained for t in refs)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and trained == {t.number for t in complete}
    # the front holds feasible trials only
    assert result.front and all(study.trials[n].user_attrs["feasible"] for n in result.front)


# -- a sampler that repeats itself ---------------------------------------------------------------
class _Stuck(optuna.samplers.RandomSampler):
    """Proposes the first label of every unit, always: the all-normal reference, a duplicate."""

    def sample_independent(self, study, trial, param_name, param_distribution):
        return param_distribution.choices[0]


def test_a_sampler_that_repeats_itself_gets_untried_architectures(tmp_path, base_dir, monkeypatch):
    # Without the fallback the run stops after 50 duplicates with 2 of 6 trials done.
    monkeypatch.setattr(optuna.samplers, "RandomSampler", _Stuck)
    space, result, study, _ = _run(
        tmp_path, base_dir, "stuck", strategy={"name": "random"}, budget={"trials": 6}
    )
    assert result.status == "finished" and result.done == 6
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    archs = [tuple(sorted(t.params.items())) for t in complete]
    assert len(complete) == 6 and len(set(archs)) == 6
    untried = [t for t in complete if "untried_after_duplicates" in t.user_attrs]
    assert untried and all(t.user_attrs["untried_after_duplicates"] >= 3 for t in untried)
    skipped = [t for t in study.trials if "skipped" in t.user_attrs]
    assert skipped and all(t.user_attrs["skipped"].startswith("duplicate") for t in skipped)


def test_a_search_ends_when_every_architecture_has_been_trained(tmp_path, base_dir, monkeypatch):
    monkeypatch.setattr(optuna.samplers, "RandomSampler", _Stuck)
    _, result, study, _ = _run(
        tmp_path,
        base_dir,
        "spent",
        strategy={"name": "random"},
        budget={"trials": 5},
        choices={"tie": "all"},  # one unit, normal or static F4: two architectures
    )
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len({tuple(sorted(t.params.items())) for t in complete}) == len(complete) == 2
    assert result.status == "finished" and result.done == 2
    assert "every architecture of the space has been trained once" in result.message


def test_differentiable_search_on_a_user_network(tmp_path, monkeypatch):
    """The supernet of any network: the example VGG (examples/smallnets.py), its own base."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the factory imports from the root
    space = tiny_space(
        name="user_dnas",
        strategy={"name": "differentiable", **STRATEGY_OPTIONS["differentiable"]},
        budget={"trials": 1},
    )
    space["model"] = {"name": "examples.smallnets:vgg_cifar", "kwargs": {"width": 4}}
    path = write_space(tmp_path / "user_dnas.yaml", space)
    loaded = load_space(path)
    options = RunOptions(threads=1, report=False, results=str(tmp_path / "results"))
    result = run_search(loaded, options, progress=False)
    assert result.status == "finished"
    study = study_at(tmp_path, "user_dnas")
    swept = [t for t in study.trials if t.user_attrs.get("source") == "differentiable"]
    assert swept and all(t.state == TrialState.COMPLETE for t in swept)
    arch = Arch.from_yaml(swept[0].user_attrs["arch"])
    assert arch.model.name == "examples.smallnets:vgg_cifar"
    assert sorted(arch.layer_names) == sorted(s.name for s in loaded.specs)
    assert 0.0 <= swept[0].user_attrs["val_acc"] <= 1.0
