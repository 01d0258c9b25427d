"""The fidelity levers of F6 and sub-8-bit Winograd (docs/fidelity.md, benchmarks/frontier.py).

What is checked:

* ``fake_quantize_pow2``: one power-of-two scale per slice, the smallest that holds the slice,
  so nothing clips; dyadic entries within the grid's reach come back exactly; the gradient
  passes straight through.
* ``transforms="tap"``: the quantized ``A^T`` and ``B^T`` of F2/F4/F6 at 8 bits are the exact
  Cook-Toom matrices (with one scale per matrix F6's ``A^T`` is off by up to 1/8), ``G`` is off
  by at most half a step of its row's scale; in float64 with 16-bit transforms and nothing
  else quantized the layer computes the direct convolution; flex layers learn through them.
* ``wd_bits``: the three Winograd-domain quantizers take it and nothing else does; a wider
  domain brings the layer closer to the float convolution.
* ``LayerChoice``/``Arch``: the two keys round-trip through YAML and checkpoints, build the
  layers they name, and bad values get one line naming the key; the search space offers them.
* distillation: the loss's value, its validation, and a fit that distills from its
  ``init_from`` (and refuses to start from scratch); ``train.py --distill`` and its errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wasearch import train_cli
from wasearch.arch import Arch, ArchError, LayerChoice
from wasearch.cli import UserError
from wasearch.engine import TrainConfig, distillation_loss, fit, load_checkpoint
from wasearch.latency.ops import conv_key
from wasearch.layers import WinogradConv2d
from wasearch.models import build
from wasearch.quant import fake_quantize_pow2, pow2_amax, qmax
from wasearch.winograd import transform_matrices

WIDTH = 0.125


# -- the power-of-two quantizer -------------------------------------------------------------------
def test_pow2_scales_are_the_smallest_powers_of_two_that_hold_each_slice():
    amax = torch.tensor([1.0, 5.25, 32.0, 1e-3])
    got = pow2_amax(amax, 8)
    scales = got / qmax(8)
    assert torch.equal(torch.log2(scales), torch.round(torch.log2(scales)))  # powers of two
    assert (got >= amax).all()
    assert (got / 2 < amax).all()  # the next smaller power would not hold the slice


def test_pow2_quantizer_is_exact_on_dyadic_rows_and_passes_gradients():
    rows = torch.tensor(
        [[1.0, 0.5, 0.25, 0.125, 1 / 16, 1 / 32], [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]]
    )
    x = rows.clone().requires_grad_(True)
    y = fake_quantize_pow2(x, 8, 0)
    assert torch.equal(y.detach(), rows)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(rows))
    # A per-tensor scale cannot hold the first row's small entries: it rounds them off.
    per_tensor = fake_quantize_pow2(rows.reshape(1, -1), 8, 0).reshape(2, -1)
    assert not torch.equal(per_tensor, rows)
    # Not dyadic: rounded to the row's grid, within half a step.
    third = torch.tensor([[1 / 3, 1.0]])
    err = (fake_quantize_pow2(third, 8, 0) - third).abs().max()
    assert 0 < err <= pow2_amax(torch.tensor(1.0), 8) / qmax(8) / 2


# -- transforms="tap" -----------------------------------------------------------------------------
@pytest.mark.parametrize("tile", [2, 4, 6])
def test_tap_transforms_hold_cook_toom_exactly_at_8_bits(tile):
    layer = WinogradConv2d(4, 4, tile=tile, bits=8, transforms="tap", granularity="tap")
    A_t, G, B_t = layer.transforms()
    assert torch.equal(A_t, layer.A_t)
    assert torch.equal(B_t, layer.B_t)
    row_step = layer.G.abs().amax(dim=1, keepdim=True) / qmax(8)
    assert ((G - layer.G).abs() <= row_step / 2 + 1e-7).all()
    tensor = WinogradConv2d(4, 4, tile=tile, bits=8, granularity="tap").transforms()
    if tile == 6:  # one scale for 1/32 .. 32: the powers of 1/2 below 1/4 round off
        assert (tensor[0] - layer.A_t).abs().max() >= 0.1


def test_tap_transforms_in_float64_compute_the_direct_convolution():
    torch.manual_seed(0)
    layer = WinogradConv2d(3, 5, tile=6, bits=16, transforms="tap").double()
    for name in ("q_input", "q_weight", "q_weight_wd", "q_input_wd", "q_product", "q_output"):
        getattr(layer, name).bits = None  # only the transforms quantized
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64)
    ref = F.conv2d(x, layer.weight, padding=1)
    y = layer(x)
    assert (y - ref).abs().max() / ref.abs().max() < 1e-4  # G's 16-bit rows: ~1e-5
    layer.q_transform.bits = None
    assert torch.allclose(layer(x), ref, atol=1e-10)


def test_flex_tap_transforms_learn():
    torch.manual_seed(0)
    layer = WinogradConv2d(3, 4, tile=4, mode="flex", bits=8, transforms="tap")
    layer(torch.randn(2, 3, 8, 8)).square().mean().backward()
    for name in ("A_t", "G", "B_t"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0


# -- wd_bits --------------------------------------------------------------------------------------
def test_wd_bits_sets_the_winograd_domain_quantizers_only():
    layer = WinogradConv2d(4, 4, tile=4, bits=8, wd_bits=10)
    assert [layer.q_weight_wd.bits, layer.q_input_wd.bits, layer.q_product.bits] == [10] * 3
    assert [layer.q_input.bits, layer.q_weight.bits, layer.q_output.bits] == [8] * 3
    assert layer.q_transform.bits == 8
    assert "wd_bits=10" in repr(layer)
    with pytest.raises(ValueError, match="wd_bits"):
        WinogradConv2d(4, 4, tile=4, bits=None, wd_bits=10)
    with pytest.raises(ValueError, match="wd_bits"):
        WinogradConv2d(4, 4, tile=4, bits=8, wd_bits=20)
    with pytest.raises(ValueError, match="transforms"):
        WinogradConv2d(4, 4, tile=4, bits=8, transforms="row")


def test_a_wider_domain_and_tap_transforms_each_bring_f6_closer_to_the_float_conv():
    torch.manual_seed(0)
    x = torch.randn(8, 16, 12, 12)
    w = torch.randn(16, 16, 3, 3) * 0.1
    ref = F.conv2d(x, w, padding=1)

    def error(**options) -> float:
        layer = WinogradConv2d(16, 16, tile=6, bits=8, granularity="tap", **options)
        with torch.no_grad():
            layer.weight.copy_(w)
        layer.train()
        layer(x)  # set the running ranges
        layer.eval()
        with torch.no_grad():
            return ((layer(x) - ref).norm() / ref.norm()).item()

    base = error()
    assert error(wd_bits=10) < base
    assert error(transforms="tap") < base
    assert error(transforms="tap", wd_bits=10) < 0.5 * base


# -- LayerChoice, Arch, checkpoints, latency ------------------------------------------------------
def _lever_arch() -> Arch:
    base = Arch.uniform("normal", None, 8, width=WIDTH)
    return base.with_layers(
        {
            "layer2.0.conv1": LayerChoice("static", 6, 8, "tap", "tap", 10),
            "layer3.1.conv2": LayerChoice("flex", 4, 6, "tap", "tap", None),
        }
    )


def test_levers_round_trip_through_yaml_and_build_their_layers(tmp_path):
    arch = _lever_arch()
    text = arch.to_yaml()
    assert "transforms: tap" in text and "wd_bits: 10" in text
    assert Arch.from_yaml(text) == arch
    assert Arch.load(arch.save(tmp_path / "a.yaml")) == arch
    modules = dict(build(arch).named_modules())
    f6 = modules["layer2.0.conv1"]
    assert (f6.transform_scales, f6.wd_bits, f6.q_product.bits) == ("tap", 10, 10)
    assert modules["layer3.1.conv2"].transform_scales == "tap"
    assert modules["layer3.1.conv2"].wd_bits is None
    assert LayerChoice("static", 6, 8, "tap", "tap", 10).label == "F6-static/8tx-w10"
    # the defaults stay out of the YAML
    assert "transforms" not in Arch.uniform("static", 4, 8, width=WIDTH).to_yaml()


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        ({"conv": "static", "tile": 4, "bits": 8, "transforms": "row"}, "transforms='row'"),
        ({"conv": "static", "tile": 4, "bits": 8, "wd_bits": 1}, "wd_bits=1 is out of range"),
        ({"conv": "static", "tile": 4, "bits": 8, "wd_bits": True}, "wd_bits=True"),
        ({"conv": "normal", "bits": 8, "wd_bits": 10}, "normal conv, which has no Winograd"),
        ({"conv": "normal", "bits": 8, "transforms": "tap"}, "normal conv"),
        ({"conv": "static", "tile": 4, "bits": None, "wd_bits": 10}, "floating-point conv"),
    ],
)
def test_bad_lever_values_get_one_line_naming_the_key(choice, message):
    with pytest.raises(ArchError, match=message) as info:
        LayerChoice.from_dict(choice, "layers.layer1.0.conv1")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("layers.layer1.0.conv1: ")


def test_latency_prices_a_winograd_layer_at_its_domain_bits():
    spec = Arch.uniform("normal", None, 8, width=WIDTH).specs()[0]
    key = conv_key(spec, LayerChoice("static", 6, 8, "tap", "tap", 10))
    assert key.bits == 10
    assert conv_key(spec, LayerChoice("static", 6, 8, "tap", "tap")).bits == 8
    assert conv_key(spec, LayerChoice("normal", None, 8)).bits == 8
    # ... so the analytical model charges the wider domain its int16 product, and nothing for
    # the tap transforms
    from wasearch.latency import load_latency_model

    a73 = load_latency_model("cortex-a73")
    plain, tap, wide = (
        a73.layer_cost(spec, LayerChoice("static", 6, 8, "tap", t, wd))
        for t, wd in (("tensor", None), ("tap", None), ("tap", 10))
    )
    assert tap == plain < wide


def test_lever_arch_trains_checkpoints_and_reloads(tiny_data, tmp_path):
    arch = _lever_arch()
    model = build(arch)
    config = TrainConfig(epochs=1, batch_size=32, eval_batch_size=32)
    fit(model, tiny_data, config, out_dir=tmp_path / "run", progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt.arch == arch
    layer = dict(ckpt.model.named_modules())["layer2.0.conv1"]
    assert (layer.transform_scales, layer.wd_bits) == ("tap", 10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ckpt.model(x), model.eval()(x))


# -- distillation ---------------------------------------------------------------------------------
def test_distillation_loss_mixes_cross_entropy_and_the_soft_targets():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 10), torch.randn(6, 10)
    ce = F.cross_entropy(logits, torch.arange(6))
    off = TrainConfig(distill=0.0)
    assert torch.equal(distillation_loss(ce, logits, target, off), ce)
    full = TrainConfig(distill=1.0, distill_temperature=2.0)
    kl = F.kl_div(F.log_softmax(logits / 2, 1), F.softmax(target / 2, 1), reduction="batchmean")
    assert torch.allclose(distillation_loss(ce, logits, target, full), 4 * kl)
    same = distillation_loss(ce, logits, logits.clone(), full)
    assert same.abs() < 1e-6  # no loss when the student is the teacher
    for bad in ({"distill": -0.1}, {"distill": 1.5}, {"distill_temperature": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_fit_distills_from_its_init_checkpoint_and_refuses_from_scratch(tiny_data, tmp_path):
    teacher_arch = Arch.uniform("normal", None, 8, width=WIDTH)
    config = TrainConfig(epochs=1, batch_size=32, eval_batch_size=32, max_batches_per_epoch=1)
    fit(build(teacher_arch), tiny_data, config, out_dir=tmp_path / "base", progress=False)
    student = build(Arch.uniform("static", 4, 8, granularity="tap", width=WIDTH))
    distill = TrainConfig(
        epochs=1, batch_size=32, eval_batch_size=32, max_batches_per_epoch=1, distill=0.5
    )
    with pytest.raises(ValueError, match="starts from scratch"):
        fit(student, tiny_data, distill, progress=False)
    result = fit(
        student,
        tiny_data,
        distill,
        out_dir=tmp_path / "student",
        init_from=tmp_path / "base" / "last.pt",
        progress=False,
    )
    assert result.last_epoch == 1
    saved = torch.load(tmp_path / "student" / "last.pt", weights_only=True)
    assert saved["config"]["distill"] == 0.5
    assert saved["extra"]["teacher_from"].endswith("last.pt")


def test_train_py_distill_and_lever_flags(tmp_path, capsys):
    common = [
        "--dataset", "synthetic", "--limit-train", "32", "--limit-test", "32",
        "--val-fraction", "0", "--epochs", "1", "--batch_size", "32", "--no-progress",
        "--use_cpu", "--outDir", str(tmp_path),
    ]  # fmt: skip
    common_w = [*common, "--mult", str(WIDTH)]
    assert train_cli.main(["--use_normal_conv", "--Q", "--run-name", "base", *common_w]) == 0
    argv = ["--static", "--F", "6", "--Q", "--granularity", "tap", "--transforms", "tap"]
    argv += ["--wd-bits", "10", "--distill", "0.5", "--modelDir", str(tmp_path / "base")]
    assert train_cli.main([*argv, *common_w]) == 0
    run = tmp_path / f"adapt_synthetic_static_F6_tap_ttap_wd10_8bit_w{WIDTH:g}_seed0"
    saved = Arch.load(run / "arch.yaml")
    assert saved.choice("layer1.0.conv1") == LayerChoice("static", 6, 8, "tap", "tap", 10)
    capsys.readouterr()
    bad = [
        (["--static", "--Q", "--distill", "0.5"], "--distill 0.5 needs --modelDir"),
        (["--static", "--Q", "--distill", "2", "--modelDir", "x"], "--distill 2.0 must be in"),
        (["--use_normal_conv", "--Q", "--transforms", "tap"], "--transforms tap needs --static"),
        (["--static", "--wd-bits", "10"], "--wd-bits 10 needs --static or --flex, and --Q"),
        (["--static", "--Q", "--wd-bits", "40"], "--wd-bits 40 is out of range"),
        (["--arch", "a.yaml", "--wd-bits", "10"], "--wd-bits conflicts with --arch"),
    ]
    for flags, message in bad:
        with pytest.raises(UserError, match=message):
            train_cli.main([*flags, *common])


def test_weights_of_8_bit_transforms_match_the_matrices_module():
    # the layer's buffers are the module's exact matrices: what "exact" is measured against
    for tile in (4, 6):
        layer = WinogradConv2d(2, 2, tile=tile, bits=8, transforms="tap")
        for mine, theirs in zip(
            (layer.A_t, layer.G, layer.B_t), transform_matrices(tile, 3), strict=True
        ):
            assert torch.equal(mine, theirs)


# -- the search space -----------------------------------------------------------------------------
def test_the_space_offers_the_levers_as_dimensions(tmp_path):
    from wasearch.search.base import trial_config
    from wasearch.search.space import load_space, parse_space
    from wasearch.search.testing import tiny_space, write_space

    space = parse_space(
        tiny_space(
            choices={
                "conv": ["normal", "static"],
                "tile": [4],
                "bits": [8],
                "transforms": ["tap"],
                "wd_bits": [None, 8, 10],
            },
            trial={"distill": 0.5},
        ),
        source="s",
    )
    labels = space.units[0].labels
    # wd_bits 8 on an 8-bit layer is the same option as null: offered once
    assert labels == ("normal/8", "F4-static/8tx", "F4-static/8tx-w10")
    names = dict(space.references())
    assert set(names["static-F4"].values()) == {"F4-static/8tx"}
    assert trial_config(space).distill == 0.5
    for change, key, words in [
        ({"choices": {"transforms": ["row"]}}, "choices.transforms", "'row' is not one of"),
        ({"choices": {"wd_bits": [40]}}, "choices.wd_bits", "40 is not a bit-width"),
        ({"trial": {"distill": 2}}, "trial.distill", "must be in [0, 1]"),
    ]:
        path = write_space(tmp_path / "x.yaml", tiny_space(**change))
        with pytest.raises(UserError) as info:
            load_space(path)
        assert str(info.value).startswith(f"{path}: {key}: ")
        assert words in str(info.value)


@pytest.mark.parametrize(
    ("argv", "label"),
    [
        (["--static", "--Q"], "F4-static/8tx"),  # the defaults: per-tap ranges and transforms
        (["--static", "--Q", "--granularity", "tensor", "--transforms", "tensor"], "F4-static/8"),
        (["--use_normal_conv", "--Q"], "normal/8"),  # no Winograd domain: nothing per tap
        (["--static", "--F", "2"], "F2-static/fp"),  # floating point: nothing quantized
    ],
)
def test_train_py_defaults_apply_to_quantized_winograd_layers_only(argv, label):
    args = train_cli.build_parser().parse_args(argv)
    train_cli._resolve_classic_flags(args)
    arch = train_cli._arch_from_args(args)
    assert {c.label for _, c in arch} == {label}
    assert arch.default.label == label
