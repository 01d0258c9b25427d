import subprocess
import sys
from pathlib import Path

import pytest

from wasearch.arch import Arch, ArchError, LayerChoice
from wasearch.models import searchable_convs

REPO = Path(__file__).resolve().parents[1]


def test_searchable_convs_geometry():
    specs = searchable_convs("resnet18", 0.5, 32)
    assert len(specs) == 16
    assert specs[0].name == "layer1.0.conv1" and specs[0].shape == (32, 32, 32, 32)
    assert specs[4].name == "layer2.0.conv1" and specs[4].shape == (32, 64, 16, 16)
    assert specs[-1].name == "layer4.1.conv2" and specs[-1].shape == (256, 256, 4, 4)


def test_yaml_round_trip(tmp_path):
    arch = Arch.uniform("normal", bits=8, width=0.25).with_layers(
        {
            "layer2.0.conv1": LayerChoice("flex", 4, 8),
            "layer3.1.conv2": LayerChoice("static", 6, 16, "tap"),
            "layer4.0.conv2": LayerChoice("static", 2, None),
        }
    )
    path = arch.save(tmp_path / "a.yaml")
    again = Arch.load(path)
    assert again == arch
    assert again.choice("layer3.1.conv2").granularity == "tap"
    assert "F4-flex/8 x1" in again.summary()


def test_default_applies_to_unlisted_layers():
    arch = Arch.from_yaml(
        "width: 0.5\ndefault: {conv: static, tile: 2, bits: 8}\n"
        "layers:\n  layer1.0.conv1: {conv: normal, bits: 8}\n"
    )
    assert arch.choice("layer1.0.conv1") == LayerChoice("normal", None, 8)
    assert arch.choice("layer4.1.conv2") == LayerChoice("static", 2, 8)


@pytest.mark.parametrize(
    "text, message",
    [
        ("layers: {layer1.0.conv1: {conv: fancy}}", "layer1.0.conv1: unknown conv kind 'fancy'"),
        ("layers: {layer2.0.conv2: {conv: flex, tile: 4, bits: 1}}", "layer2.0.conv2: bits=1"),
        ("layers: {layer3.0.conv1: {conv: flex, tile: 4, bits: 17}}", "layer3.0.conv1: bits=17"),
        ("layers: {layer4.0.conv1: {conv: static, tile: 6, bits: 8}}", None),  # partial tile
        ("layers: {layer1.0.conv1: {conv: static, tile: 3}}", None),
        ("layers: {layer1.0.conv1: {conv: static}}", "layer1.0.conv1: tile=None"),
        ("layers: {layer9.0.conv1: {conv: normal}}", "unknown layer 'layer9.0.conv1'"),
        ("layers: {layer1.0.conv1: {conv: normal, tiles: 2}}", "unknown key"),
        ("colour: blue", "unknown key"),
        ("backbone: vgg", "backbone"),
        ("width: -1", "width"),
        ("layers: [", "not valid YAML"),
    ],
)
def test_validation_errors_name_layer_and_value(text, message):
    if message is None:  # tile 3 is legal (any 2..8), just unusual; any tile takes any input
        Arch.from_yaml(text)
        return
    with pytest.raises(ArchError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Arch.from_yaml(text)


def test_uniform_f6_falls_back_on_small_inputs():
    arch = Arch.uniform("flex", 6, 8)
    assert arch.choice("layer3.0.conv1").tile == 6
    assert arch.choice("layer4.0.conv1").tile == 4  # 4x4 input: F6 needs an 8x8 tile
    assert arch.notes() == []


def test_a_tile_larger_than_its_input_is_accepted_with_a_note():
    # The new user's case of the issue: 28x28 images, layer4 sees 3x3 inputs.
    arch = Arch.uniform("static", 4, None, input_size=28, fallback=False)
    assert arch.choice("layer4.0.conv1").tile == 4
    notes = arch.notes()
    assert len(notes) == 4 and notes[0].startswith("layer4.0.conv1: F4 on a 3x3 input")
    assert Arch.from_yaml(arch.to_yaml()) == arch


def test_load_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: {layer1.0.conv1: {conv: fancy}}")
    with pytest.raises(ArchError, match="bad.yaml: layer1.0.conv1"):
        Arch.load(bad)
    with pytest.raises(ArchError, match="missing.yaml"):
        Arch.load(tmp_path / "missing.yaml")


# What importing the architecture side costs: the package's names load lazily, so reading an
# arch file or a space's geometry must not pull in torch or the model builder.
_IMPORT_ARCH_ALONE = """
import sys
import wasearch.arch, wasearch.geometry
arch = wasearch.arch.Arch.uniform("flex", 4, 8, width=0.25)
assert arch.specs()[0].name == "layer1.0.conv1"
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "wasearch.")))
print(" ".join(loaded))
"""


def test_arch_does_not_import_torch_or_the_model_builder():
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_ARCH_ALONE],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.split()
    assert "torch" not in out
    assert "wasearch.models" not in out and "wasearch.layers" not in out
    assert "wasearch.geometry" in out


def test_package_names_load_on_first_use():
    import wasearch

    assert wasearch.Arch is __import__("wasearch.arch").arch.Arch
    assert set(wasearch.__all__) <= set(dir(wasearch))
    for name in wasearch.__all__:
        assert getattr(wasearch, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        wasearch.nope  # noqa: B018


def test_limits_and_geometry_have_one_home():
    from wasearch import geometry, layers, models, quant, winograd

    assert layers.CONV_KINDS is geometry.CONV_KINDS
    assert layers.GRANULARITIES is geometry.GRANULARITIES
    assert (quant.MIN_BITS, quant.MAX_BITS) == (geometry.MIN_BITS, geometry.MAX_BITS)
    assert winograd.MAX_TILE == geometry.MAX_TILE
    assert models.ConvSpec is geometry.ConvSpec
    assert models.searchable_convs is geometry.searchable_convs
    assert models.BACKBONES is geometry.BACKBONES
    assert set(geometry.SPACE_TILES) <= set(range(2, geometry.MAX_TILE + 1))


def test_model_reference_round_trips_and_keeps_the_paper_form(tmp_path):
    from wasearch.netref import PAPER, ModelRef

    paper = Arch.uniform("normal", bits=8)
    assert paper.model == PAPER and paper.is_paper
    assert "model" not in paper.to_dict() and paper.to_dict()["backbone"] == "resnet18"
    assert Arch.from_yaml("model: resnet18_cifar\nwidth: 0.25\n") == Arch(width=0.25)
    ref = ModelRef.parse(
        {"name": "torchvision:resnet18", "kwargs": {"zero_init_residual": True}}, "model"
    )
    assert ref.kind == "torchvision" and ref.kwargs_dict == {"zero_init_residual": True}
    assert ModelRef.parse(ref.to_yaml_value()) == ref
    assert ModelRef.parse("mynets.small:make").kind == "factory"


@pytest.mark.parametrize(
    "value, message",
    [
        ("resnet99", "not a model reference"),
        ("my nets:f", "not package.module:function"),
        ({"name": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}}, "no weights"),
        ({"name": "torchvision:resnet18", "colour": 1}, "unknown key"),
        ({"kwargs": {}}, "model.name: missing"),
        ({"name": "resnet18_cifar", "kwargs": {"depth": 3}}, "takes none"),
    ],
)
def test_bad_model_references_name_the_key(value, message):
    from wasearch.netref import ModelRef, ModelRefError

    with pytest.raises(ModelRefError, match=message):
        ModelRef.parse(value, "model")


def test_width_is_refused_for_a_model_that_is_not_the_papers():
    with pytest.raises(ArchError, match="width: applies only to the paper's network"):
        Arch.from_yaml("model: torchvision:resnet18\nwidth: 0.5\n")
