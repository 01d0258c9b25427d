"""Conversion of any model: each chosen conv replaced in place, weights kept, numerics exact."""

import copy

import pytest
import torch
from test_discovery import user_nets  # noqa: F401  (fixture; tests/ is on sys.path)
from torch import nn

from wasearch.arch import Arch, LayerChoice
from wasearch.discovery import build_reference
from wasearch.layers import Conv2d, WinogradConv2d
from wasearch.models import build, convert
from wasearch.netref import ModelRef

SIZES = (28, 30, 33)  # none a multiple of the 4x4 output tile all the way down


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _static_f4(ref: ModelRef, size: int, num_classes: int = 10) -> Arch:
    return Arch.uniform(
        "static", 4, None, model=ref, input_size=size, num_classes=num_classes, fallback=False
    )


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so eval mode is not an identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("size", SIZES)
def test_paper_network_all_static_f4_equals_direct_in_float64(size):
    torch.manual_seed(0)
    normal = build(Arch(width=0.25, input_size=size))
    winograd = build(Arch.uniform("static", 4, None, width=0.25, input_size=size, fallback=False))
    assert winograd.layer4[1].conv2.tile == 4  # no fallback: F4 on a 3x3 or 4x4 input
    assert not winograd.load_state_dict(normal.state_dict(), strict=False).unexpected_keys
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        _randomize_bn(normal)
        winograd.load_state_dict(normal.state_dict(), strict=False)
        ref = normal.double().eval()(x)
        out = winograd.double().eval()(x)
    assert _rel_err(out, ref) < 1e-9


@pytest.mark.parametrize("size", SIZES)
def test_torchvision_resnet_all_static_f4_equals_the_original_in_float64(size):
    torch.manual_seed(0)
    ref = ModelRef.parse("torchvision:resnet18")
    original = build_reference(ref, num_classes=10)
    with torch.no_grad():
        _randomize_bn(original)
    converted = convert(copy.deepcopy(original), _static_f4(ref, size))
    assert isinstance(converted.layer1[0].conv1, WinogradConv2d)
    assert type(converted.conv1) is nn.Conv2d  # the image-reading stem stays as it was
    assert isinstance(converted.layer2[0].downsample[0], Conv2d)  # quantizable direct conv
    assert converted.arch.model == ref
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        expected = original.double().eval()(x)
        out = converted.double().eval()(x)
    assert _rel_err(out, expected) < 1e-9


@pytest.mark.parametrize("size", SIZES)
def test_user_vgg_all_static_f4_equals_the_original_in_float64(user_nets, size):  # noqa: F811
    torch.manual_seed(0)
    ref = ModelRef.parse({"name": f"{user_nets}:make_vgg", "kwargs": {"width": 6}})
    original = build_reference(ref, num_classes=10)
    with torch.no_grad():
        _randomize_bn(original)
    arch = _static_f4(ref, size)
    assert len(arch.layers) == 5
    converted = convert(copy.deepcopy(original), arch)
    assert sum(isinstance(m, WinogradConv2d) for m in converted.modules()) == 5
    layer = converted[0][14]  # the padding-0 conv keeps its padding and its bias
    assert layer.padding == (0, 0) and torch.equal(layer.bias, original[0][14].bias)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        expected = original.double().eval()(x)
        out = converted.double().eval()(x)
    assert _rel_err(out, expected) < 1e-9


def test_build_from_an_arch_with_a_checkpoint_starts_from_the_users_weights(
    user_nets,  # noqa: F811
    tmp_path,
):
    ref = ModelRef.parse(f"{user_nets}:make_vgg")
    trained = build_reference(ref, num_classes=10)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "mine.pt")
    with_ckpt = ModelRef.parse({"name": ref.text, "checkpoint": str(tmp_path / "mine.pt")})
    arch = Arch.uniform("flex", 2, 8, model=with_ckpt, input_size=32).with_layers(
        {"0.3": LayerChoice("normal", None, 8)}
    )
    model = build(arch)
    assert type(model[0][3]) is Conv2d and model[0][3].bits == 8
    assert isinstance(model[0][7], WinogradConv2d) and model[0][7].mode == "flex"
    assert torch.equal(model[0][7].weight, trained[0][7].weight)
    # Quantized and flex: a forward and backward pass give every parameter a gradient.
    model.train()
    out = model(torch.randn(4, 3, 32, 32))
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert torch.isfinite(out).all()
    again = Arch.from_yaml(arch.to_yaml())
    assert again == arch and again.model.checkpoint == str(tmp_path / "mine.pt")


def test_tiny_search_on_a_user_model_runs_end_to_end_and_its_export_trains(
    user_nets,  # noqa: F811  (also the working directory: tmp_path)
    tmp_path,
):
    import json

    from wasearch.search import RunOptions, export_trials, load_space, run_search
    from wasearch.search.testing import tiny_space, write_space
    from wasearch.train_cli import main as train_main

    torch.set_num_threads(1)
    space = tiny_space(
        name="anynet",
        objectives=["accuracy"],
        latency={},
        strategy={"name": "tpe"},
        choices={"tie": "stage", "groups": {"late": ["0.1[0-9]"]}, "tile": [2, 4]},
    )
    space["model"] = {"name": f"{user_nets}:make_vgg", "kwargs": {"width": 4}}
    result = run_search(
        load_space(write_space(tmp_path / "anynet.yaml", space)),
        RunOptions(threads=1, report=False),
        progress=False,
    )
    assert result.status == "finished" and result.done == 4
    exported = export_trials(tmp_path / "results" / "anynet", trial=result.front[0])
    arch = Arch.load(exported[0].path)
    assert arch.model.text == f"{user_nets}:make_vgg" and arch.layer_names[0] == "0.3"
    rc = train_main(
        [
            "--arch", str(exported[0].path), "--dataset", "synthetic", "--epochs", "1",
            "--limit-train", "64", "--limit-test", "32", "--val-fraction", "0.012",
            "--batch_size", "32", "--use_cpu", "--no-progress", "--out-dir", "runs",
            "--run-name", "exported",
        ]
    )  # fmt: skip
    assert rc == 0
    final = json.loads((tmp_path / "runs" / "exported" / "final.json").read_text())
    assert final["arch"] == arch.summary()


def test_latency_models_price_other_networks_end_to_end():
    from wasearch.latency import load_latency_model

    arch = Arch.uniform("normal", None, 8, model=ModelRef.parse("torchvision:resnet18"))
    report = load_latency_model("cortex-a73").price(arch)
    # the searchable convs, and the rest (stem, pools, shortcuts, head) priced from the trace
    assert len(report.layers) == 13 and all(v > 0 for v in report.layers.values())
    assert report.total > 1.05 * sum(report.layers.values())
