"""Tap-wise Winograd-domain quantization (Andri et al., 2022): one range per tile position.

What is checked: a tap-wise quantizer keeps one range per index of dimension 0 (running and
current ranges alike) and is exactly the per-tensor quantizer applied to each position on its own;
when every position shares one range it reduces to the per-tensor quantizer, outputs and
gradients; a ``WinogradConv2d`` built with ``granularity="tap"`` sizes its three Winograd-domain
quantizers to (m + 2)^2 positions and nothing else; an ``Arch`` with ``granularity: tap``
round-trips through YAML, builds, trains, checkpoints and reloads, from the library and from
train.py (``--granularity tap`` and ``--arch``).
"""

from __future__ import annotations

import json

import pytest
import torch

from wasearch import train_cli
from wasearch.arch import Arch, LayerChoice
from wasearch.engine import TrainConfig, fit, init_from_checkpoint, load_checkpoint
from wasearch.layers import WinogradConv2d
from wasearch.models import build
from wasearch.quant import FakeQuantize, qmax

WIDTH = 0.125  # 8..64 channels: fast


def _positions_with_different_ranges(taps: int = 16, seed: int = 0) -> torch.Tensor:
    """(taps, 5, 7) with position p spanning about 10^(p / 4): ranges over four decades."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, 3.75, taps).view(-1, 1, 1)
    return torch.randn(taps, 5, 7, generator=g) * scale


def _shared_range(taps: int = 16, seed: int = 1) -> torch.Tensor:
    """(taps, 5, 7) where every position has min -2.5 and max 3.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(taps, 5, 7, generator=g) * 5.5 - 2.5
    x[:, 0, 0], x[:, 0, 1] = -2.5, 3.0
    return x


# --------------------------------------------------------------------------------------------
# The quantizer


def test_running_tap_ranges_are_one_per_position_with_their_own_moving_average():
    q = FakeQuantize(8, granularity="tap", channels=16)
    assert q.min_val.shape == q.max_val.shape == (16,)
    q.train()
    a, b = _positions_with_different_ranges(seed=0), _positions_with_different_ranges(seed=1)
    q(a)
    lo, hi = torch.aminmax(a.reshape(16, -1), dim=1)
    assert torch.equal(q.min_val, lo) and torch.equal(q.max_val, hi)
    q(b)
    lo_b, hi_b = torch.aminmax(b.reshape(16, -1), dim=1)
    torch.testing.assert_close(q.max_val, 0.99 * hi + 0.01 * hi_b)
    torch.testing.assert_close(q.min_val, 0.99 * lo + 0.01 * lo_b)
    # The ranges really differ by position (what a single scale cannot serve).
    amax = torch.maximum(q.min_val.abs(), q.max_val.abs())
    assert amax.max() / amax.min() > 1000
    # Evaluation reads the stored ranges and moves none of them.
    q.eval()
    stored = q.max_val.clone()
    q(b * 10)
    assert torch.equal(q.max_val, stored)


@pytest.mark.parametrize("running", [True, False])
def test_tap_equals_the_per_tensor_quantizer_applied_position_by_position(running):
    x = _positions_with_different_ranges()
    tap = FakeQuantize(8, running=running, granularity="tap", channels=16)
    y = tap(x)
    for p in range(16):
        per_tensor = FakeQuantize(8, running=running)
        torch.testing.assert_close(y[p], per_tensor(x[p]), rtol=0, atol=0)
    # Against torch's own per-channel kernel along the tap axis.
    amax = x.reshape(16, -1).abs().amax(dim=1)
    scale = amax / qmax(8)
    ref = torch.fake_quantize_per_channel_affine(
        x, scale, torch.zeros(16, dtype=torch.int32), 0, -qmax(8), qmax(8)
    )
    torch.testing.assert_close(y, ref)
    # Each position keeps its own resolution: the relative error is small everywhere, while one
    # scale for all sends the small positions to zero.
    tensor_y = FakeQuantize(8, running=running)(x)
    rel_tap = (y - x).reshape(16, -1).norm(dim=1) / x.reshape(16, -1).norm(dim=1)
    rel_tensor = (tensor_y - x).reshape(16, -1).norm(dim=1) / x.reshape(16, -1).norm(dim=1)
    assert rel_tap.max() < 0.01
    assert rel_tensor[0] > 0.5  # the smallest position is (almost) all zeros


@pytest.mark.parametrize("running", [True, False])
def test_tap_reduces_to_per_tensor_when_every_position_shares_a_range(running):
    x = _shared_range().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    tap = FakeQuantize(8, running=running, granularity="tap", channels=16)
    tensor = FakeQuantize(8, running=running)
    y_tap, y_tensor = tap(x), tensor(x2)
    assert torch.equal(y_tap, y_tensor)
    grad = torch.randn_like(y_tap)
    y_tap.backward(grad)
    y_tensor.backward(grad)
    assert torch.equal(x.grad, x2.grad)
    if running:
        # Stored ranges equal too, and evaluation (clipping to them) agrees as well.
        assert torch.equal(tap.max_val, tensor.max_val.expand(16))
        tap.eval()
        tensor.eval()
        z = _shared_range(seed=2) * 1.5  # beyond the range: clipping happens
        assert torch.equal(tap(z), tensor(z))


def test_tap_quantizer_state_dict_round_trips_and_rejects_a_per_tensor_one():
    q = FakeQuantize(8, granularity="tap", channels=16)
    q(_positions_with_different_ranges())
    again = FakeQuantize(8, granularity="tap", channels=16)
    again.load_state_dict(q.state_dict())
    assert torch.equal(again.max_val, q.max_val) and bool(again.initialized)
    with pytest.raises(RuntimeError, match="size mismatch"):
        FakeQuantize(8).load_state_dict(q.state_dict())


def test_tap_needs_channels():
    with pytest.raises(ValueError, match="channels"):
        FakeQuantize(8, granularity="tap")
    with pytest.raises(ValueError, match="granularity"):
        FakeQuantize(8, granularity="channel", channels=4)


# --------------------------------------------------------------------------------------------
# The layer


@pytest.mark.parametrize("tile", [2, 4, 6])
@pytest.mark.parametrize("mode", ["static", "flex"])
def test_layer_tap_quantizers_are_the_winograd_domain_ones(tile, mode):
    torch.manual_seed(tile)
    layer = WinogradConv2d(4, 5, tile=tile, mode=mode, bits=8, granularity="tap")
    layer.train()
    layer(torch.randn(2, 4, 12, 12))
    a2 = (tile + 2) ** 2
    for name in ("q_input_wd", "q_product"):
        assert getattr(layer, name).min_val.shape == (a2,), name
    assert layer.q_weight_wd.granularity == "tap" and not layer.q_weight_wd.running
    for name in ("q_input", "q_output"):
        assert getattr(layer, name).min_val.shape == (), name
    assert layer.q_transform.granularity == "tensor"


def test_layer_with_all_positions_at_one_range_equals_the_per_tensor_layer():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    tensor = WinogradConv2d(4, 5, tile=4, mode="static", bits=8)
    tensor.train()
    tensor(x)  # initialize the running ranges
    tap = WinogradConv2d(4, 5, tile=4, mode="static", bits=8, granularity="tap")
    state = {}
    for key, value in tensor.state_dict().items():
        tap_value = tap.state_dict()[key]
        state[key] = value.expand_as(tap_value).clone() if value.dim() == 0 else value
    tap.load_state_dict(state)
    # The weights' Winograd-domain range is their own, so it differs by position unless the
    # weights make it equal; make both layers use one shared weight range by quantizing the
    # Winograd-domain weights per tensor in both (only the activation ranges are compared here).
    tap.q_weight_wd = tensor.q_weight_wd
    tensor.eval()
    tap.eval()
    z = torch.randn(3, 4, 8, 8) * 1.3
    assert torch.equal(tap(z), tensor(z))


def test_tap_layer_is_closer_to_the_float_conv_than_per_tensor_at_f4_8_bits():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16, 16)
    errors = {}
    for granularity in ("tensor", "tap"):
        layer = WinogradConv2d(8, 8, tile=4, mode="static", bits=8, granularity=granularity)
        layer.train()
        layer(x)
        layer.eval()
        ref = torch.nn.functional.conv2d(x, layer.weight, padding=1)
        errors[granularity] = ((layer(x) - ref).norm() / ref.norm()).item()
    assert errors["tap"] < errors["tensor"]


# --------------------------------------------------------------------------------------------
# Arch, model, training, checkpoints, train.py


def _tap_arch() -> Arch:
    base = Arch.uniform("normal", None, 8, width=WIDTH)
    return base.with_layers(
        {
            "layer2.0.conv1": LayerChoice("static", 4, 8, "tap"),
            "layer3.1.conv2": LayerChoice("flex", 4, 8, "tap"),
            "layer4.0.conv2": LayerChoice("flex", 2, 8, "tap"),
        }
    )


def test_arch_with_tap_round_trips_through_yaml_and_builds_tap_layers(tmp_path):
    arch = _tap_arch()
    text = arch.to_yaml()
    assert "granularity: tap" in text
    again = Arch.from_yaml(text)
    assert again == arch
    path = arch.save(tmp_path / "tap.yaml")
    assert Arch.load(path) == arch
    modules = dict(build(again).named_modules())
    assert modules["layer3.1.conv2"].granularity == "tap"
    assert modules["layer3.1.conv2"].q_product.min_val.shape == (36,)
    assert modules["layer4.0.conv2"].q_input_wd.min_val.shape == (16,)
    assert "granularity: tap" not in Arch.uniform("static", 4, 8, width=WIDTH).to_yaml()


def test_tap_arch_trains_checkpoints_and_reloads(tiny_data, tmp_path):
    arch = _tap_arch()
    model = build(arch)
    config = TrainConfig(epochs=1, batch_size=32, eval_batch_size=32)
    result = fit(model, tiny_data, config, out_dir=tmp_path / "run", progress=False)
    assert result.last_epoch == 1
    layer = dict(model.named_modules())["layer3.1.conv2"]
    assert bool(layer.q_product.initialized)
    assert torch.isfinite(layer.q_product.max_val).all()
    # Positions see different ranges in a real pipeline.
    amax = torch.maximum(layer.q_input_wd.min_val.abs(), layer.q_input_wd.max_val.abs())
    assert amax.max() > 2 * amax.min()
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt.arch == arch
    reloaded = dict(ckpt.model.named_modules())["layer3.1.conv2"]
    assert torch.equal(reloaded.q_product.max_val, layer.q_product.max_val)
    # Tensor -> tap adaptation: the Winograd-domain ranges start empty (another granularity).
    tensor_arch = arch.with_layers({"layer3.1.conv2": LayerChoice("flex", 4, 8, "tensor")})
    empty = init_from_checkpoint(build(tensor_arch), tmp_path / "run" / "last.pt")
    assert "layer3.1.conv2.q_product" in empty
    assert "layer2.0.conv1.q_product" not in empty


def test_train_py_granularity_tap_and_arch_file(tmp_path, capsys):
    common = [
        "--dataset", "synthetic", "--limit-train", "32", "--limit-test", "32",
        "--val-fraction", "0", "--epochs", "1", "--batch_size", "32", "--no-progress",
        "--use_cpu", "--outDir", str(tmp_path),
    ]  # fmt: skip
    argv = ["--static", "--F", "2", "--Q", "--bits", "8", "--granularity", "tap", *common]
    argv += ["--mult", str(WIDTH)]
    assert train_cli.main(argv) == 0
    run = tmp_path / f"synthetic_static_F2_tap_ttap_8bit_w{WIDTH:g}_seed0"
    assert (run / "final.json").is_file()
    saved = Arch.load(run / "arch.yaml")
    assert {c.granularity for _, c in saved} == {"tap"}
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt.model.layer1[0].conv1.q_input_wd.min_val.shape == (16,)

    arch_file = _tap_arch().save(tmp_path / "tap.yaml")
    argv = ["--arch", str(arch_file), *common]  # no --mult: the file sets the width
    assert train_cli.main(argv) == 0
    run = tmp_path / "synthetic_tap_arch_w0.125_seed0"
    final = json.loads((run / "final.json").read_text())
    assert "F4-flex/8t" in final["arch"]
    assert load_checkpoint(run / "best.pt").arch == _tap_arch()
    capsys.readouterr()
