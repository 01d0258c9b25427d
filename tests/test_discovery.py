"""Discovery of the searchable convolutions of any model, by one traced forward pass."""

import importlib
import sys

import pytest
import torch
from torch import nn

from wasearch.arch import Arch
from wasearch.discovery import FIRST_CONV, discover, format_table, trace_convs
from wasearch.geometry import searchable_convs
from wasearch.models import build
from wasearch.netref import ModelRef, ModelRefError

# A VGG-style user model, written to a module in the working directory as a user would.
VGG_SOURCE = """
from torch import nn


def make_vgg(num_classes=10, width=4, checkpoint_note=None):
    w = width
    def block(c_in, c_out, padding=1):
        return [nn.Conv2d(c_in, c_out, 3, padding=padding), nn.BatchNorm2d(c_out), nn.ReLU()]
    features = [
        *block(3, w), *block(w, w), nn.MaxPool2d(2),
        *block(w, 2 * w), *block(2 * w, 2 * w, padding="same"), nn.MaxPool2d(2),
        *block(2 * w, 4 * w, padding=0), *block(4 * w, 4 * w, padding=2),
    ]
    return nn.Sequential(
        nn.Sequential(*features), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )


def needs_depth(depth, num_classes=10):
    raise RuntimeError(f"depth {depth} is not supported")


def not_a_model(num_classes=10):
    return 42
"""


@pytest.fixture
def user_nets(tmp_path, monkeypatch):
    """A fresh module name per test: the factory is imported from the working directory."""
    name = f"user_nets_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(VGG_SOURCE)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)
    importlib.invalidate_caches()


def test_paper_network_traced_matches_its_geometry():
    # Tracing the paper's net finds exactly the convs its hand-written geometry lists: 2 per
    # BasicBlock x 8 blocks = 16, with the same input shapes; the stem and the three 1x1
    # projection shortcuts are listed with their reasons.
    found = trace_convs(build(Arch(width=0.25, input_size=32)), (3, 32, 32))
    assert found.specs == searchable_convs("resnet18", 0.25, 32)
    assert len(found.searchable) == 16
    reasons = {c.name: c.reason for c in found.other}
    assert reasons == {
        "conv1": FIRST_CONV,
        "layer2.0.shortcut.0": "1x1 kernel",
        "layer3.0.shortcut.0": "1x1 kernel",
        "layer4.0.shortcut.0": "1x1 kernel",
    }


def test_torchvision_resnet18_discovery():
    # torchvision's ResNet-18: 8 BasicBlocks of two 3x3 convs; the first conv of layer2..4 has
    # stride 2, so 16 - 3 = 13 are searchable; the 7x7 stem and 3 1x1 downsamples are not.
    found = discover(ModelRef.parse("torchvision:resnet18"), num_classes=10, input_size=64)
    names = [c.name for c in found.searchable]
    assert len(names) == 13
    assert names[:4] == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]
    assert "layer2.0.conv1" not in names and "layer2.0.conv2" in names
    reasons = {c.name: c.reason for c in found.other}
    assert reasons["conv1"] == "7x7 kernel, stride 2"
    assert reasons["layer2.0.conv1"] == "stride 2"
    assert reasons["layer3.0.downsample.0"] == "1x1 kernel, stride 2"
    assert len(found.other) == 7
    # 64 -> stem /2 -> maxpool /2: layer1 sees 16x16, layer4's second conv 2x2.
    spec = {s.name: s for s in found.specs}
    assert spec["layer1.0.conv1"].shape == (64, 64, 16, 16)
    assert spec["layer4.1.conv2"].shape == (512, 512, 2, 2)
    assert "13 searchable of 20 convolutions" in format_table(found)


def test_user_factory_vgg_discovery(user_nets):
    # make_vgg: 6 3x3 stride-1 convs; the first reads the image: 5 searchable, paddings 1,
    # "same", 0 and 2 all accepted.
    found = discover(ModelRef.parse(f"{user_nets}:make_vgg"), num_classes=7, input_size=28)
    assert [c.name for c in found.searchable] == [f"0.{i}" for i in (3, 7, 10, 14, 17)]
    assert [c.padding for c in found.searchable] == [(1, 1), (1, 1), (1, 1), (0, 0), (2, 2)]
    assert [c.name for c in found.other] == ["0.0"]
    assert found.output_shape == (1, 7)


def test_reasons_for_every_kind_of_unsearchable_conv():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.s2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.g2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.dil = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
            self.refl = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
            self.twice = nn.Conv2d(8, 8, 3, padding=1)
            self.ok = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.s2(self.stem(x))
            x = self.refl(self.dil(self.g2(self.dw(x))))
            x = self.ok(self.twice(self.twice(x)))
            return self.fc(x.mean((2, 3)))

    found = trace_convs(Odd(), (3, 16, 16))
    assert [c.name for c in found.searchable] == ["ok"]
    reasons = {c.name: c.reason for c in found.other}
    assert reasons == {
        "stem": FIRST_CONV,
        "s2": "stride 2",
        "dw": "depthwise",
        "g2": "groups 2",
        "dil": "dilation (2, 2)",
        "refl": "padding_mode reflect",
        "twice": "called 2 times per forward",
    }
    assert found.searchable[0].height == 8


@pytest.mark.parametrize(
    "name, message",
    [
        ("torchvision:resnet99", "torchvision has no model 'resnet99'"),
        ("no_such_package_xyz.nets:make", "cannot import 'no_such_package_xyz.nets'"),
        ("{nets}:nope", "has no function 'nope'"),
        ("{nets}:needs_depth", "raised TypeError"),
        ("{nets}:not_a_model", "returned int, not a module"),
    ],
)
def test_references_that_do_not_build_name_the_cause(user_nets, name, message):
    ref = ModelRef.parse(name.format(nets=user_nets))
    with pytest.raises(ModelRefError, match=message):
        discover(ref, num_classes=10, input_size=32)


def test_a_factory_that_raises_is_named(user_nets):
    ref = ModelRef.parse({"name": f"{user_nets}:needs_depth", "kwargs": {"depth": 5}})
    with pytest.raises(ModelRefError, match="raised RuntimeError: depth 5 is not supported"):
        discover(ref, num_classes=10, input_size=32)


def test_an_input_the_model_rejects_and_a_wrong_class_count(user_nets):
    # Valid padding 0 and the pools shrink 8x8 below a 3x3 kernel.
    with pytest.raises(ModelRefError, match="rejects a 1x3x8x8 input"):
        discover(ModelRef.parse(f"{user_nets}:make_vgg"), num_classes=10, input_size=8)
    ref = ModelRef.parse({"name": f"{user_nets}:make_vgg", "kwargs": {"num_classes": 5}})
    with pytest.raises(ModelRefError, match=r"expected \(1, 10\) logits"):
        discover(ref, num_classes=10, input_size=32)


def test_a_model_with_nothing_to_search_is_refused():
    with pytest.raises(ModelRefError, match="has no searchable convolution"):
        discover(ModelRef.parse("torchvision:mobilenet_v3_small"), num_classes=10, input_size=32)


def test_checkpoint_keys_must_match(user_nets, tmp_path):
    from wasearch.discovery import build_reference

    ref = ModelRef.parse(f"{user_nets}:make_vgg")
    model = build_reference(ref, num_classes=10)
    state = model.state_dict()
    torch.save(state, tmp_path / "good.pt")
    bad = {k.replace("0.3.", "0.9."): v for k, v in state.items()}
    torch.save(bad, tmp_path / "bad.pt")
    good_ref = ModelRef.parse({"name": ref.text, "checkpoint": str(tmp_path / "good.pt")})
    again = build_reference(good_ref, num_classes=10)
    assert torch.equal(again.state_dict()["0.3.weight"], state["0.3.weight"])
    bad_ref = ModelRef.parse({"name": ref.text, "checkpoint": str(tmp_path / "bad.pt")})
    with pytest.raises(ModelRefError, match=r"model.checkpoint: .*missing: 0.3.weight"):
        build_reference(bad_ref, num_classes=10)
    missing = ModelRef.parse({"name": ref.text, "checkpoint": str(tmp_path / "none.pt")})
    with pytest.raises(ModelRefError, match="does not exist"):
        build_reference(missing, num_classes=10)


def test_timm_is_an_optional_extra():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ModelRefError, match="needs timm, an optional extra"):
            discover(ModelRef.parse("timm:resnet18"), num_classes=10, input_size=32)
        pytest.skip("timm is not installed (an optional extra); its refusal was checked")
    found = discover(ModelRef.parse("timm:resnet18"), num_classes=10, input_size=64)
    assert len(found.searchable) == 13


def test_every_operation_is_recorded_in_forward_order(user_nets):
    found = discover(ModelRef.parse(f"{user_nets}:make_vgg"), num_classes=7, input_size=28)
    names = [o.name for o in found.ops]
    # 6 blocks of conv, BatchNorm, ReLU; 2 max-pools; the adaptive pool, flatten and linear
    assert len(names) == 6 * 3 + 2 + 3 and len(set(names)) == len(names)
    assert names[:4] == ["0.0", "0.1", "0.2", "0.3"] and names[-3:] == ["1", "2", "3"]
    first, pool = found.ops[0], found.ops[6]
    assert (first.category, first.kind, first.params) == (
        "conv",
        "Conv2d",
        "k3x3 s1x1 p1x1 d1x1 g1",
    )
    assert first.inputs == ((1, 3, 28, 28),) and first.output == (1, 4, 28, 28)
    assert (pool.name, pool.category, pool.params) == ("0.6", "pool", "k2x2 s2x2 p0x0")
    assert [o.category for o in found.ops[-3:]] == ["pool", "free", "linear"]
    assert all(o.module == o.name for o in found.ops)  # no functions between modules


def test_functions_between_modules_and_repeated_calls_are_recorded():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.ReLU()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.act(self.conv(x))
            y = self.act(y + x.mean(1, keepdim=True))  # the same module, called again
            return self.fc(torch.flatten(y.mean((2, 3)), 1))

    found = trace_convs(Twice(), (3, 8, 8))
    assert [o.name for o in found.ops] == ["conv", "act", "act#2:pre", "act#2", "fc:pre", "fc"]
    glue = found.ops[2]
    assert (glue.module, glue.category, glue.kind) == (None, "functions", "mean+add")
    assert glue.params == "mean 1x3x8x8->1x1x8x8; add 1x4x8x8|1x1x8x8->1x4x8x8"
    assert found.ops[3].module == "act" and found.ops[4].kind == "mean+flatten"


def test_the_example_models_have_the_convolutions_their_docstrings_say(monkeypatch):
    from pathlib import Path

    from wasearch.discovery import discover
    from wasearch.netref import ModelRef

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # factories import from the root
    vgg = discover(ModelRef.parse("examples.smallnets:vgg_cifar"), num_classes=10, input_size=32)
    assert [s.name for s in vgg.specs] == [
        "stage2.block1.conv", "stage3.block1.conv", "stage3.block2.conv",
        "stage4.block1.conv", "stage4.block2.conv",
    ]  # fmt: skip
    ref = ModelRef.parse("examples.smallnets:fullres_net")
    full = discover(ref, num_classes=10, input_size=32)
    assert len(full.specs) == 4 and {(s.height, s.width) for s in full.specs} == {(32, 32)}
