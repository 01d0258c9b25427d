"""Search-space validation: every error names the file and the key; units, removals, references."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from wasearch.arch import LayerChoice
from wasearch.cli import UserError
from wasearch.latency import load_latency_model
from wasearch.search.space import load_space, parse_space
from wasearch.search.testing import tiny_space, write_space

REPO = Path(__file__).resolve().parents[1]


def _error(space: dict, tmp_path: Path) -> str:
    path = write_space(tmp_path / "x.yaml", space)
    with pytest.raises(UserError) as info:
        load_space(path)
    return str(info.value)


@pytest.mark.parametrize(
    "change, key, words",
    [
        ({"choices": {"tile": [2, 5]}}, "choices.tile", "5 is not one of 2, 4, 6"),
        ({"choices": {"conv": ["normal", "fancy"]}}, "choices.conv", "'fancy' is not one of"),
        ({"choices": {"bits": [8, 40]}}, "choices.bits", "40 is not a bit-width"),
        ({"choices": {"granularity": ["row"]}}, "choices.granularity", "'row' is not one of"),
        ({"choices": {"tie": "pair"}}, "choices.tie", "'pair' is not one of"),
        ({"choices": {"tiles": [2]}}, "choices.tiles", "unknown key"),
        ({"choices": {"groups": {"g": ["layer9.*"]}}}, "choices.groups.g", "matches no"),
        (
            {"choices": {"layers": {"layer1.*": {"conv": "warp"}}}},
            "choices.layers.layer1.*.conv",
            "'warp'",
        ),
        ({"data": {"limit_trian": 5}}, "data.limit_trian", "unknown key"),
        ({"data": {"dataset": "mnist"}}, "data.dataset", "'mnist' is not one of"),
        ({"data": {"val_fraction": 0}}, "data.val_fraction", "never on the test set"),
        ({"data": {"batch_size": 0}}, "data.batch_size", "must be >= 1"),
        ({"model": {"width": -1}}, "model.width", "must be > 0"),
        ({"model": {"backbone": "vgg"}}, "model.backbone", "'vgg' is not one of"),
        ({"base": {"conv": "static"}}, "base.tile", "needs a tile"),
        ({"base": {"epochs": 0}}, "base.epochs", ">= 1"),
        ({"trial": {"lr": "fast"}}, "trial.lr", "must be a number or auto"),
        ({"trial": {"transform_lr": 0}}, "trial.transform_lr", "must be > 0"),
        ({"base": {"transform_lr": "x"}}, "base.transform_lr", "must be a number"),
        ({"objectives": ["latency_ms", "accuracy"]}, "objectives", "first objective"),
        ({"objectives": ["accuracy", "speed"]}, "objectives", "'speed' is not one of"),
        ({"latency": {"kind": "magic"}}, "latency.kind", "'magic' is not one of"),
        ({"latency": {}}, "latency", "is required"),
        ({"constraints": {"latency_ms": -2}}, "constraints.latency_ms", "> 0"),
        ({"strategy": {"name": "cmaes"}}, "strategy.name", "'cmaes' is not one of"),
        ({"strategy": {"pruner": "median"}}, "strategy.pruner", "cannot prune multi-objective"),
        ({"strategy": {"scalarize": {"weight": 1}}}, "strategy.scalarize.weight", "unknown key"),
        ({"budget": {"trials": 0}}, "budget.trials", ">= 1"),
        ({"storage": {"grace_period": 1}}, "storage.grace_period", "longer than"),
        ({"name": "a b"}, "name", "non-empty string"),
        ({"colour": "red"}, "colour", "unknown key"),
    ],
)
def test_errors_name_the_file_and_key(tmp_path, change, key, words):
    message = _error(tiny_space(**change), tmp_path)
    assert message.startswith(f"{tmp_path / 'x.yaml'}: {key}: "), message
    assert words in message


def test_tile_error_reads_like_the_docs(tmp_path):
    message = _error(tiny_space(choices={"tile": [2, 4, 5]}), tmp_path)
    assert message == f"{tmp_path / 'x.yaml'}: choices.tile: 5 is not one of 2, 4, 6"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="no such space file"):
        load_space(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match=r"bad\.yaml: not valid YAML"):
        load_space(bad)


def test_measured_table_missing_says_the_measure_command(tmp_path):
    space = tiny_space(latency={"kind": "measured", "path": str(tmp_path / "t.csv")})
    message = _error(space, tmp_path)
    assert f"latency.path: {tmp_path / 't.csv'} does not exist" in message
    assert message.endswith(f"python search.py measure {tmp_path / 'x.yaml'}")
    # `search.py measure` builds that table, so it loads the space without requiring it
    path = write_space(tmp_path / "x.yaml", space)
    assert load_space(path, require_latency_table=False).latency["kind"] == "measured"


def test_gp_without_scipy_says_what_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a)
    )
    message = _error(tiny_space(strategy={"name": "gp"}), tmp_path)
    assert "strategy.name: gp needs scipy" in message and "pip install scipy" in message


def test_every_tile_offered_on_small_inputs_and_said_once():
    space = parse_space(
        tiny_space(model={"width": 0.5}, choices={"tile": [2, 4, 6], "tie": "layer"}),
        source="s.yaml",
    )
    assert len(space.units) == 16
    for unit in space.units:  # F6 on the 4x4 inputs of stage 4 too: one partial tile
        assert any(o.tile == 6 for o in unit.options), unit.name
    assert space.notes == (
        "F6 on layer4.* (4x4 input) computes one partial tile: most of its work is wasted; "
        "the latency model prices it",
    )
    priced = load_latency_model("cortex-a73")
    spec = space.specs[-1]  # 4x4: F6 computes 36 outputs for 16, F4 exactly 16
    f4, f6 = (priced.layer_cost(spec, LayerChoice("static", t, 8)) for t in (4, 6))
    assert f6 > f4  # the wasted work is priced: the search may still prefer F4 there


def test_units_ties_groups_and_fixed_layers():
    by_stage = parse_space(tiny_space(), source="s")
    assert [u.name for u in by_stage.units] == ["layer1", "layer2", "layer3", "layer4"]
    assert by_stage.units[0].labels == ("normal/8", "F4-static/8t")
    assert by_stage.size == 16
    by_block = parse_space(tiny_space(choices={"tie": "block"}), source="s")
    assert len(by_block.units) == 8
    grouped = parse_space(
        tiny_space(
            choices={
                "tie": "all",
                "groups": {"early": ["layer1.*", "layer2.0.*"]},
                "layers": {"layer4.1.conv2": {"conv": "normal"}},
            }
        ),
        source="s",
    )
    names = [u.name for u in grouped.units]
    assert names == ["early", "all"]
    assert len(grouped.units[0].layers) == 6
    assert dict(grouped.fixed) == {
        "layer4.1.conv2": grouped.units[0].option("normal/8"),
    }
    # an arch from parameters, and back
    arch = grouped.arch({"early": "F4-static/8t", "all": "normal/8"})
    assert arch.choice("layer1.0.conv1").label == "F4-static/8t"
    assert arch.choice("layer3.0.conv1").label == "normal/8"
    assert grouped.params_of(arch) == {"early": "F4-static/8t", "all": "normal/8"}


def test_references_exist_only_in_the_space():
    space = parse_space(tiny_space(), source="s")  # normal/static, F4 only
    names = [n for n, _ in space.references()]
    assert names == ["all-normal", "static-F4"]
    full = parse_space(
        tiny_space(choices={"conv": ["normal", "static", "flex"], "tile": [2, 4]}), source="s"
    )
    refs = dict(full.references())
    assert list(refs) == ["all-normal", "static-F2", "static-F4", "flex-F2", "flex-F4"]
    assert set(refs["flex-F4"].values()) == {"F4-flex/8t"}


def test_defaults_single_objective_and_scalarized():
    single = parse_space(
        tiny_space(objectives=["accuracy"], latency={}, strategy={"name": None}), source="s"
    )
    assert single.strategy["name"] == "tpe" and single.directions == ["maximize"]
    scal = parse_space(tiny_space(strategy={"name": None, "scalarize": {"latency_weight": 0.3}}),
                       source="s")  # fmt: skip
    assert scal.study_objectives == ("score",) and scal.strategy["name"] == "tpe"
    assert not scal.multi_objective


@pytest.mark.parametrize("name", ["quick", "resnet18_cifar10"])
def test_shipped_spaces_validate(name):
    space = load_space(REPO / "spaces" / f"{name}.yaml")
    assert space.units and len(space.references()) == 5
    if name == "resnet18_cifar10":
        assert len(space.units) == 16 and space.model["width"] == 0.5
        assert space.latency["profile"] == "cortex-a73"
        assert space.units[0].labels[:2] == ("normal/8", "normal/16")


def test_transform_lr_reaches_the_training_configs():
    from wasearch.search.base import base_config as _base_config
    from wasearch.search.base import trial_config

    plain = parse_space(tiny_space(), source="s")
    assert trial_config(plain).transform_lr is None and _base_config(plain).transform_lr is None
    tuned = parse_space(
        tiny_space(trial={"transform_lr": 0.005}, base={"transform_lr": 0.002}), source="s"
    )
    assert trial_config(tuned).transform_lr == 0.005
    assert _base_config(tuned).transform_lr == 0.002


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ({"epochs": 60, "lr": 1e-3}, 5e-5),  # the paper's base: 1e-3 decayed twice
        ({"epochs": 5, "lr": 1e-3}, 5e-5),
        ({"epochs": 2, "lr": 2e-3}, 1e-3),  # milestones 1 and 2: the last epoch ran at 2e-4
        ({"epochs": 1, "lr": 1e-3}, 5e-3),  # one epoch: no decay ran
    ],
)
def test_auto_trial_lr_follows_the_end_of_the_base_schedule(base, expected):
    from wasearch.search.base import trial_config

    space = parse_space(tiny_space(base=base, trial={"lr": "auto"}), source="s")
    assert trial_config(space).lr == pytest.approx(expected)
    explicit = parse_space(tiny_space(base=base, trial={"lr": 3e-4}), source="s")
    assert trial_config(explicit).lr == 3e-4


def test_trial_lr_defaults_to_auto():
    from wasearch.search.space import DEFAULTS

    assert DEFAULTS["trial"]["lr"] == "auto"


def _any_model_space(model: dict, **changes) -> dict:
    """The tiny space on another network: accuracy only (unless ``changes`` say otherwise)."""
    space = tiny_space(**{"objectives": ["accuracy"], "latency": {}, **changes})
    space["model"] = model
    return space


def test_a_torchvision_model_is_searched_by_module_path_with_generic_ties():
    space = parse_space(
        _any_model_space(
            {"name": "torchvision:resnet18", "input_size": 128},  # layer4: 4x4, F4 fits
            choices={"tie": "block", "groups": {"late": ["layer4.*"]}},
        ),
        source="s",
    )
    assert space.model_ref.text == "torchvision:resnet18"
    assert len(space.specs) == 13  # 16 3x3 convs, 3 of them stride 2
    names = [u.name for u in space.units]
    # blocks are the layers' parent modules; layer2.0 keeps only its stride-1 conv2
    assert names == ["late", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0",
                     "layer3.1"]  # fmt: skip
    assert space.units[0].layers == ("layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2")
    arch = space.arch({u.name: "F4-static/8t" for u in space.units})
    assert arch.model == space.model_ref and arch.choice("layer4.1.conv2").tile == 4
    assert space.params_of(arch) == {u.name: "F4-static/8t" for u in space.units}
    assert space.base_arch().model == space.model_ref
    by_stage = parse_space(
        _any_model_space(
            {"name": "torchvision:resnet18", "input_size": 128}, choices={"tie": "stage"}
        ),
        source="s",
    )
    assert [u.name for u in by_stage.units] == ["layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize(
    "model, changes, key, words",
    [
        ({"name": "resnet99"}, {}, "model.name", "not a model reference"),
        ({"name": "torchvision:nope"}, {}, "model.name", "torchvision has no model 'nope'"),
        ({"name": "no_pkg_xyz:make"}, {}, "model.name", "cannot import 'no_pkg_xyz'"),
        (
            {"name": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}},
            {},
            "model.kwargs",
            "no weights are downloaded",
        ),
        ({"name": "torchvision:resnet18", "width": 0.5}, {}, "model.width", "paper's network"),
        (
            {"name": "torchvision:mobilenet_v3_small"},  # depthwise and strided 3x3s only
            {},
            "model",
            "no searchable convolution",
        ),
        (
            {"name": "torchvision:resnet18", "checkpoint": "missing.pt"},
            {},
            "model.checkpoint",
            "does not exist",
        ),
        (
            {"name": "torchvision:resnet18"},
            {"choices": {"groups": {"g": ["features.*"]}}},
            "choices.groups.g",
            "matches no searchable layer",
        ),
    ],
)
def test_bad_model_sections_name_the_key(tmp_path, model, changes, key, words):
    message = _error(_any_model_space(model, **changes), tmp_path)
    assert f"x.yaml: {key}" in message and words in message
    assert "\n" not in message


def test_a_latency_model_prices_any_network_of_a_space():
    space = parse_space(
        _any_model_space(
            {"name": "torchvision:resnet18", "input_size": 32},
            objectives=["accuracy", "latency_ms"],
            latency={"kind": "analytical", "profile": "cortex-a73"},
        ),
        source="s",
    )
    report = load_latency_model(space.latency).price(space.base_arch())
    assert list(report.layers) == [s.name for s in space.specs]
    assert report.parts["conv1"] > 0 and report.parts["fc"] > 0  # the rest, from the trace


def test_inspect_lists_every_conv_and_the_units_without_training(tmp_path):
    import subprocess
    import sys

    from wasearch.search.cli import inspect_text

    text = inspect_text(
        parse_space(
            _any_model_space({"name": "torchvision:resnet18", "input_size": 64}), source="s"
        )
    )
    assert "s: torchvision:resnet18 at 3x64x64, 10 classes" in text
    assert "13 searchable of 20 convolutions" in text
    assert "layer2.0.conv1" in text and "no: stride 2" in text
    assert "no: 7x7 kernel, stride 2" in text
    paper = inspect_text(parse_space(tiny_space(), source="t"))
    assert "16 searchable of 20 convolutions" in paper and "4 searched unit(s)" in paper
    # the command: a bad reference is one line and exit code 2
    bad = write_space(tmp_path / "bad.yaml", _any_model_space({"name": "torchvision:nope"}))
    r = subprocess.run(
        [sys.executable, str(REPO / "search.py"), "inspect", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "bad.yaml: model.name: torchvision has no model 'nope'" in r.stderr
    assert not (tmp_path / "results").exists()
