"""Deploy kernels: the inference model equals the float training model; integer kernels."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

from wasearch import Arch, LayerChoice, build, cpu_kernels
from wasearch.deploy import (
    DirectConv,
    WinogradConv,
    has_int_kernel,
    int8_available,
    pick_fastest_forms,
    to_deploy,
    winograd_deploy_conv2d,
    winograd_input_tiles,
)
from wasearch.winograd import transform_matrices

WIDTH = 0.125


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so folding is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


@pytest.mark.parametrize(
    ("conv", "tile"), [("normal", None), ("static", 2), ("static", 4), ("static", 6), ("flex", 4)]
)
def test_deploy_equals_float_training_model(conv: str, tile: int | None) -> None:
    torch.manual_seed(0)
    model = _randomize(build(Arch.uniform(conv, tile, None, width=WIDTH)))
    if conv == "flex":  # learned transforms: perturb them away from Cook-Toom
        with torch.no_grad():
            for m in model.modules():
                if isinstance(getattr(m, "G", None), torch.nn.Parameter):
                    for t in (m.A_t, m.G, m.B_t):
                        t.add_(0.05 * torch.randn_like(t))
    x = torch.randn(2, 3, 32, 32)
    deployed = to_deploy(model)
    with torch.no_grad():
        expected = model(x)
        got = deployed(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not model.training  # conversion leaves the model's mode alone
    assert set(deployed.kernels.values()) == {"fp32"}


def test_mixed_arch_and_flex_f6_deploy() -> None:
    torch.manual_seed(1)
    arch = Arch.uniform("normal", width=WIDTH).with_layers(
        {
            "layer1.0.conv1": Arch.uniform("flex", 6, width=WIDTH).choice("layer1.0.conv1"),
            "layer2.1.conv2": Arch.uniform("static", 2, width=WIDTH).choice("layer2.1.conv2"),
            "layer4.1.conv1": Arch.uniform("static", 4, width=WIDTH).choice("layer4.1.conv1"),
        }
    )
    model = _randomize(build(arch))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(to_deploy(model)(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tile", [2, 4, 6])
@pytest.mark.parametrize("transform", ["kron", "separable"])
@pytest.mark.parametrize("size", [(7, 9), (8, 8)])
def test_winograd_kernel_matches_conv2d(tile: int, transform: str, size: tuple[int, int]) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 5, *size)
    w, b = torch.randn(6, 5, 3, 3), torch.randn(6)
    A_t, G, B_t = transform_matrices(tile)
    conv = WinogradConv(w, b, A_t, G, B_t, transform=transform)
    for fmt in (torch.contiguous_format, torch.channels_last):
        y = conv(x.contiguous(memory_format=fmt))
        torch.testing.assert_close(y, F.conv2d(x, w, b, padding=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_tiles", [None, 1, 5])
def test_winograd_function_in_image_groups(chunk_tiles: int | None) -> None:
    torch.manual_seed(5)
    A_t, G, B_t = transform_matrices(4)
    x, w = torch.randn(3, 4, 6, 6), torch.randn(5, 4, 3, 3)
    u_t = (torch.kron(G, G) @ w.reshape(20, 9).t()).reshape(36, 5, 4).transpose(1, 2)
    y = winograd_deploy_conv2d(x, u_t.contiguous(), A_t, B_t, chunk_tiles=chunk_tiles)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tile", [4, 6])
@pytest.mark.parametrize("size", [(1, 1), (2, 2), (4, 4), (3, 5)])
def test_winograd_kernel_on_a_layer_smaller_than_its_tile(tile: int, size) -> None:
    """A layer smaller than the tile is one zero-padded partial tile, cropped: still conv2d."""
    torch.manual_seed(6)
    x = torch.randn(2, 5, *size)
    w, b = torch.randn(6, 5, 3, 3), torch.randn(6)
    conv = WinogradConv(w, b, *transform_matrices(tile))
    y = conv(x)
    assert y.shape == (2, 6, *size)
    torch.testing.assert_close(y, F.conv2d(x, w, b, padding=1), rtol=1e-4, atol=1e-4)


def test_uniform_f6_without_fallback_deploys_on_small_layers() -> None:
    """F6 kept on the 4x4 and 2x2 layers of a 16x16 network (Arch.uniform(fallback=False)):
    the deploy model equals the training model; 8-bit calibration takes its partial tiles."""
    torch.manual_seed(7)
    arch = Arch.uniform("static", 6, None, width=WIDTH, input_size=16, fallback=False)
    assert arch.choice("layer4.1.conv2").tile == 6  # a 2x2 input
    model = _randomize(build(arch))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(to_deploy(model)(x), model(x), rtol=1e-4, atol=1e-5)
    if int8_available():
        q = build(Arch.uniform("static", 6, 8, width=WIDTH, input_size=16, fallback=False))
        with torch.no_grad():
            assert to_deploy(q.eval(), calibration=x)(x).shape == (2, 10)


needs_int8 = pytest.mark.skipif(not int8_available(), reason="no oneDNN int8 kernel here")


@needs_int8
@pytest.mark.parametrize("signed", [False, True])
def test_int8_direct_kernel_is_exact_on_its_grid(signed: bool) -> None:
    """Quantized values in, the kernel's float output equals conv2d of the dequantized values:
    the 7-bit side (see deploy's doc) keeps AVX2's int16 pair sums from saturating."""
    torch.manual_seed(3)
    x = torch.randn(2, 16, 6, 6)
    if not signed:
        x = x.relu()
    w, b = torch.randn(8, 16, 3, 3), torch.randn(8)
    conv = DirectConv(w, b, padding=1, bits=8, act_amax=float(x.abs().max()), signed_input=signed)
    levels = 127  # both grids hold +-127 (signed) or 0..127 (non-negative) levels
    scale = float(x.abs().max()) / levels
    xq = (torch.round(x / scale).clamp(-levels, levels)) * scale
    wq = conv.qweight.float() * conv.w_scales.view(-1, 1, 1, 1)
    torch.testing.assert_close(conv(x), F.conv2d(xq, wq, b, padding=1), rtol=1e-4, atol=1e-3)


@needs_int8
@pytest.mark.parametrize(("conv", "tile"), [("normal", None), ("static", 2), ("static", 4)])
def test_int8_deploy_tracks_float_deploy(conv: str, tile: int | None) -> None:
    torch.manual_seed(4)
    model = build(Arch.uniform(conv, tile, 8, width=WIDTH, granularity="tap", input_size=16))
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 16, 16))  # give the running quantizers a range
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    q, f = to_deploy(model), to_deploy(model, int8=False)
    assert q.kernels["layer1.0.conv1"] == "int8" and f.kernels["layer1.0.conv1"] == "fp32"
    with torch.no_grad():
        yq, yf = q(x), f(x)
    corr = torch.corrcoef(torch.stack([yq.flatten(), yf.flatten()]))[0, 1]
    assert corr > 0.99


def test_bit_widths_without_kernel_are_flagged() -> None:
    model = _randomize(build(Arch.uniform("static", 4, 16, width=WIDTH)))
    assert not has_int_kernel(16) and has_int_kernel(None)
    with pytest.warns(UserWarning, match="no integer kernel"):
        deployed = to_deploy(model)
    assert "layer1.0.conv1" in deployed.substituted
    assert deployed.kernels["layer1.0.conv1"] == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a float twin asked for explicitly: no warning
        to_deploy(model, int8=False)


def test_to_deploy_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match="a network from wasearch.models.build"):
        to_deploy(torch.nn.Conv2d(3, 3, 3))


def _any_net() -> torch.nn.Module:
    """A small net with a padding-0, a padding-2 and a biased searchable conv."""
    c = torch.nn.Conv2d
    return torch.nn.Sequential(
        c(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        c(8, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        c(8, 8, 3, padding=0),
        torch.nn.ReLU(),
        c(8, 8, 3, padding=2),
        c(8, 8, 3, stride=2, padding=1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )


@pytest.mark.parametrize("size", [16, 19])
def test_any_model_deploys_like_its_training_form(size: int) -> None:
    from wasearch.arch import LayerChoice
    from wasearch.models import convert
    from wasearch.netref import ModelRef

    # convert() reads the discovery of the arch's model: trace this module under a reference
    # whose builder returns it (the user's factory, monkeypatched in as a torchvision stand-in).
    torch.manual_seed(0)
    net = _randomize(_any_net())
    ref = ModelRef("factory", "deploy_any_net:make")
    import sys
    import types

    module = types.ModuleType("deploy_any_net")
    module.make = lambda num_classes=10: _randomize(_any_net())
    sys.modules["deploy_any_net"] = module
    try:
        arch = Arch.uniform("static", 4, None, model=ref, input_size=size, fallback=False)
        arch = arch.with_layers({"2": LayerChoice("normal", None, None)})
        model = convert(net, arch).eval()
        deployed = to_deploy(model, int8=False)
    finally:
        sys.modules.pop("deploy_any_net")
    assert arch.layer_names == ["2", "5", "7"]  # 0 reads the image, 8 has stride 2
    assert deployed.kernels == {"2": "fp32", "5": "fp32", "7": "fp32"}
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-5)


def test_fastest_forms_are_picked_per_layer_and_change_no_output() -> None:
    torch.manual_seed(3)
    arch = Arch.uniform("static", 4, None, width=WIDTH).with_layers(
        {
            "layer1.0.conv1": LayerChoice("static", 2, None),
            "layer2.0.conv2": LayerChoice("normal", None, None),
        }
    )
    model = _randomize(build(arch))
    x = torch.randn(4, 3, 32, 32)
    deployed = to_deploy(model)
    winograd = {n for n, c in arch if c.conv != "normal"}  # by layer name, as kernels
    assert set(deployed.forms) == winograd  # the default forms
    assert len(winograd) == sum(isinstance(m, WinogradConv) for m in deployed.modules())
    # The fused kernels where they are built; else F2's default is the Kronecker form.
    default = "fused" if cpu_kernels.available() else "kron"
    assert deployed.forms["layer1.0.conv1"] == (default, 256)
    with torch.no_grad():
        before = deployed(x)

    # A timer that prefers one form on one layer and another elsewhere: each layer keeps its own.
    def timer(module, inp):
        assert inp.shape[0] == 4  # timed on the input it receives for x
        want = ("separable", None) if module.tile == 2 else ("kron", 256)
        return 1.0 if module.form == want else 2.0

    chosen = pick_fastest_forms(deployed, x, timer=timer)
    assert set(chosen) == winograd
    assert chosen["layer1.0.conv1"] == ("separable", None)
    assert all(chosen[n] == ("kron", 256) for n in winograd - {"layer1.0.conv1"})
    kernels = [m for m in deployed.modules() if isinstance(m, WinogradConv)]
    assert all(chosen[m.layer_name] == m.form for m in kernels)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), before, rtol=1e-4, atol=1e-5)
    # Through to_deploy, with the real clock: every layer gets one of the forms.
    timed = to_deploy(model, fastest_forms_on=x[:1])
    assert set(timed.forms) == winograd
    assert all(f in WinogradConv.FORMS for f in timed.forms.values())
    with pytest.raises(ValueError, match="form"):
        kernels[0].set_form("kron", 64)


@pytest.mark.parametrize("tile", [2, 4, 6])
@pytest.mark.parametrize("bits", [None, 8])
def test_the_fused_form_computes_what_the_torch_forms_do(tile, bits):
    """The compiled kernels' tiles, transforms and untiling (one pass each way) against the
    separable torch form: any size (partial tiles), with and without bias, float32 and the
    int8 product; and both against conv2d in float32."""
    if not cpu_kernels.available():
        pytest.skip("the compiled CPU kernels could not be built here")
    if bits == 8 and not int8_available():
        pytest.skip("no int8 kernel here")
    torch.manual_seed(tile)
    for bias in (None, torch.randn(7)):
        w = torch.randn(7, 5, 3, 3)
        A_t, G, B_t = transform_matrices(tile)
        mod = WinogradConv(w, bias, A_t, G, B_t, bits=bits)
        x = torch.randn(3, 5, 13, 10).relu()
        mod.set_form("separable", None)
        ref = mod(x)
        mod.set_form("fused", 256)
        assert mod.form == ("fused", 256)
        got = mod(x)
        assert got.shape == ref.shape == (3, 7, 13, 10)
        # cropped (13 and 10 are no tile's multiples), yet one contiguous channels-last tensor:
        # a strided view made the operations after the layer pay for its crop
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert ref.is_contiguous(memory_format=torch.channels_last)
        if bits is None:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got, F.conv2d(x, w, bias, padding=1), rtol=1e-3, atol=1e-3)
            # One image per group: every group writes its own images of the output.
            xc = x.contiguous(memory_format=torch.channels_last)
            one = winograd_deploy_conv2d(
                xc, mod.u_t, mod.A_t, mod.B_t, bias=mod.bias, chunk_tiles=1, fused=True
            )
            torch.testing.assert_close(one, got, rtol=1e-4, atol=1e-4)  # GEMM sizes differ
        else:  # the same int8 product on (nearly) the same Winograd-domain input
            err = (got - ref).abs().max() / ref.abs().max()
            assert err < 0.02


@pytest.mark.parametrize("tile", [2, 4, 6])
def test_the_int8_kernel_quantizes_inside_the_input_transform(tile):
    """With a fixed range (a deployed or timed layer), the 8-bit kernel quantizes the tiles in
    the input transform's pass and scales each position's product in the output transform's:
    the uint8 input is the torch chain's bit for bit, and the output is the unfused form's up to
    float rounding, for partial tiles, with and without bias, whole batch or image by image."""
    if not cpu_kernels.available():
        pytest.skip("the compiled CPU kernels could not be built here")
    if not int8_available():
        pytest.skip("no int8 kernel here")
    ext = cpu_kernels.kernels()
    torch.manual_seed(tile)
    A_t, G, B_t = transform_matrices(tile)
    a2 = (tile + 2) ** 2
    x = torch.randn(3, 6, 13, 10).relu().contiguous(memory_format=torch.channels_last)
    xn = x.permute(0, 2, 3, 1)
    th, tw = -(-13 // tile), -(-10 // tile)
    v = ext.winograd_input(xn, B_t.contiguous(), tile, th, tw, 0, 3)  # (a2, NT, C) float
    amax = v.abs().reshape(a2, -1).amax(dim=1) * 0.8  # some values clip at either end
    scale = amax / 127
    inv = 1.0 / scale
    # The unfused chain: multiply, round half to even, add the zero point, clamp, convert.
    chain = (v * inv.view(a2, 1, 1)).round_().add_(128).clamp_(0, 255).to(torch.uint8)
    q = ext.winograd_input_q8(xn, B_t.contiguous(), tile, th, tw, 0, 3, inv, 128, 6, False)
    assert q.dtype == torch.uint8 and q.shape == (v.shape[1], a2, 6)
    assert torch.equal(q, chain.permute(1, 0, 2))
    wide = ext.winograd_input_q8(xn, B_t.contiguous(), tile, th, tw, 0, 3, inv, 128, 8, True)
    assert wide.shape == (a2, v.shape[1], 8)  # position-major, channels padded
    assert torch.equal(wide[:, :, :6], chain) and bool((wide[:, :, 6:] == 128).all())
    assert (q == 0).any() and (q == 255).any()  # both clips exercised
    for bias in (None, torch.randn(7)):
        mod = WinogradConv(torch.randn(7, 6, 3, 3), bias, A_t, G, B_t, bits=8, act_amax=amax)
        mod.set_form("fused", 256)
        got = mod(x)
        assert torch.equal(got, mod._forward_int8_fused(x, ext))  # the fused path ran
        if mod.int8_product == "vnni":  # wasearch's product against oneDNN's grouped conv
            mod.int8_product = "onednn"
            torch.testing.assert_close(mod(x), got, rtol=1e-5, atol=1e-5)
            mod.int8_product = "vnni"
        assert got.shape == (3, 7, 13, 10)
        assert got.is_contiguous(memory_format=torch.channels_last)
        mod.set_form("separable", None)
        ref = mod(x)  # float transforms, the torch chain's quantizer, the product rescaled
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
        mod.set_form("fused", 256)
        mod.chunk_tiles = 1  # one image per group
        torch.testing.assert_close(mod(x), got, rtol=1e-4, atol=1e-4)
    # A range set after construction (as the latency models do) is the one used.
    w = torch.randn(7, 6, 3, 3)
    late = WinogradConv(w, None, A_t, G, B_t, bits=8, act_amax=amax)
    before = late(x)
    late.act_amax = amax * 2
    after = late(x)
    assert not torch.equal(before, after)
    assert torch.equal(WinogradConv(w, None, A_t, G, B_t, bits=8, act_amax=amax * 2)(x), after)


def test_the_output_transform_reads_a_tile_major_scaled_product():
    """winograd_output on the int8 product's tile-major layout with a scale per position equals
    it on the position-major product scaled beforehand (up to float rounding), and without a
    scale on the contiguous layout it is unchanged."""
    if not cpu_kernels.available():
        pytest.skip("the compiled CPU kernels could not be built here")
    ext = cpu_kernels.kernels()
    torch.manual_seed(0)
    A_t, _, _ = transform_matrices(4)
    a2, nt, k = 36, 2 * 3 * 3, 5
    tile_major = torch.randn(nt, a2, k)
    scale = torch.rand(a2) + 0.1
    pos_major = tile_major.permute(1, 0, 2)
    out_a = torch.empty(2, 11, 9, k)
    out_b = torch.empty(2, 11, 9, k)
    bias = torch.randn(k)
    ext.winograd_output(pos_major, A_t, bias, out_a, 3, 3, 0, scale)  # strided view
    ext.winograd_output((pos_major * scale.view(a2, 1, 1)).contiguous(), A_t, bias, out_b, 3, 3, 0)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="pos_scale"):
        ext.winograd_output(pos_major, A_t, bias, out_a, 3, 3, 0, torch.ones(7))
    with pytest.raises(RuntimeError, match="K contiguous"):
        ext.winograd_output(pos_major.transpose(1, 2), A_t, bias, out_a, 3, 3, 0)


@pytest.mark.parametrize(
    ("c", "k", "tiles"), [(5, 7, 13), (64, 64, 200), (9, 83, 6), (130, 20, 97)]
)
def test_the_vnni_product_is_the_integer_product(c, k, tiles):
    """q8_product (AVX-512 VNNI) against the integer product computed in int64 by torch: the
    same sums, zero point and weight scales, bit for bit, for channel counts that fill no
    vector (C not a multiple of 4, K of 16) and tile counts that fill no register block."""
    if not cpu_kernels.available() or not cpu_kernels.kernels().q8_product_supported():
        pytest.skip("no AVX-512 VNNI build here")
    ext = cpu_kernels.kernels()
    torch.manual_seed(c + k)
    A_t, G, B_t = transform_matrices(4)
    mod = WinogradConv(torch.randn(k, c, 3, 3), None, A_t, G, B_t, bits=8, act_amax=1.0)
    packed, sums, scales = mod._vnni_weights()
    c4 = packed.shape[2] * 4
    q = torch.randint(0, 256, (36, tiles, c4), dtype=torch.uint8)
    q[:, :, c:] = 128  # winograd_input_q8's padding: the zero point
    got = ext.q8_product(q, packed, sums, scales, k, 128)
    w = mod.qu.view(36, k, c).to(torch.int64)
    acc = torch.einsum("ptc,pkc->ptk", q[:, :, :c].to(torch.int64) - 128, w)
    ref = acc.to(torch.float32) * mod.u_scales.view(36, k).unsqueeze(1)
    assert got.shape == (36, tiles, k)
    assert torch.equal(got, ref)
    with pytest.raises(RuntimeError, match="K must lie"):
        ext.q8_product(q, packed, sums, scales, packed.shape[1] * 16 + 1, 128)
    with pytest.raises(RuntimeError, match="multiple of 4"):
        ext.q8_product(q[:, :, : c4 - 1].contiguous(), packed, sums, scales, k, 128)


@pytest.mark.parametrize("tile", [2, 4, 6])
@pytest.mark.parametrize(("c", "k"), [(16, 16), (37, 21)])
def test_the_fused_kernels_cover_whole_and_partial_channel_vectors(tile, c, k):
    """The fused transforms work on 16 channels at a time where the AVX-512 build runs: whole
    vectors and a partial last one, on a cropped layer, float32 against conv2d and the 8-bit
    kernel against its unfused form."""
    if not cpu_kernels.available():
        pytest.skip("the compiled CPU kernels could not be built here")
    torch.manual_seed(c * tile)
    A_t, G, B_t = transform_matrices(tile)
    w, bias = torch.randn(k, c, 3, 3) / 6, torch.randn(k)
    x = torch.randn(2, c, 11, 9).relu()
    mod = WinogradConv(w, bias, A_t, G, B_t)
    mod.set_form("fused", 256)
    torch.testing.assert_close(mod(x), F.conv2d(x, w, bias, padding=1), rtol=1e-3, atol=1e-3)
    if not int8_available():
        return
    a2 = (tile + 2) ** 2
    xc = x.contiguous(memory_format=torch.channels_last)
    th, tw = -(-11 // tile), -(-9 // tile)
    v = cpu_kernels.kernels().winograd_input(xc.permute(0, 2, 3, 1), B_t, tile, th, tw, 0, 2)
    amax = v.abs().reshape(a2, -1).amax(dim=1)
    q8 = WinogradConv(w, bias, A_t, G, B_t, bits=8, act_amax=amax)
    q8.set_form("fused", 256)
    got = q8(x)
    q8.set_form("separable", None)
    ref = q8(x)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


def _transform_of_pattern(tile: int, pattern: str) -> torch.Tensor:
    """B^T of F(tile): Cook-Toom's, every entry nonzero (a learned one), or Cook-Toom's with
    one nonzero entry zeroed (a pattern of its own)."""
    B_t = transform_matrices(tile)[2].clone()
    if pattern == "dense":
        B_t += torch.where(B_t == 0, 0.05, 0.01) * (1 + torch.rand_like(B_t))
    elif pattern == "own":
        B_t[1, 2] = 0.0
    return B_t.contiguous()


# (N, C, H, W): a small input, and one past kPrefetchFromBytes (1 MiB), where the compiled
# forms prefetch the next tile's pixels (odd sizes: partial tiles and channel vectors)
_SMALL, _PAST_PREFETCH = (2, 21, 13, 10), (3, 40, 47, 45)


@pytest.mark.parametrize("tile", [2, 4, 6])
@pytest.mark.parametrize("pattern", ["cook-toom", "dense", "own"])
@pytest.mark.parametrize("shape", [_SMALL, _PAST_PREFETCH])
def test_the_input_transform_of_every_nonzero_pattern(tile, pattern, shape):
    """The input transform's compiled forms (Cook-Toom's nonzero pattern or a dense B^T, the
    zero tests folded away) and its tested form (any other pattern) against a float64
    reference, on a small input and on one large enough for the compiled forms to prefetch;
    the 8-bit transform is the torch chain on the float one bit for bit, channels padded with
    the zero point."""
    if not cpu_kernels.available():
        pytest.skip("the compiled CPU kernels could not be built here")
    ext = cpu_kernels.kernels()
    torch.manual_seed(tile)
    B_t = _transform_of_pattern(tile, pattern)
    (n, c, h, w), a = shape, tile + 2  # c: a partial last vector of channels
    x = torch.randn(n, c, h, w).relu().contiguous(memory_format=torch.channels_last)
    xn = x.permute(0, 2, 3, 1)
    th, tw = -(-h // tile), -(-w // tile)
    v = ext.winograd_input(xn, B_t, tile, th, tw, 0, n)  # (a2, NT, C)
    d = winograd_input_tiles(x.double(), tile).reshape(a, a, -1)
    ref = torch.einsum("pi,ijn,qj->pqn", B_t.double(), d, B_t.double()).reshape(a * a, n, c, -1)
    ref = ref.permute(0, 1, 3, 2).reshape(a * a, -1, c)  # (a2, N * tiles, C), as v
    torch.testing.assert_close(v.double(), ref, rtol=1e-5, atol=1e-4)
    inv = 127 / (v.abs().reshape(a * a, -1).amax(dim=1) * 0.8)
    chain = (v * inv.view(-1, 1, 1)).round_().add_(128).clamp_(0, 255).to(torch.uint8)
    q = ext.winograd_input_q8(xn, B_t, tile, th, tw, 0, n, inv, 128, -(-c // 4) * 4 + 4, True)
    assert torch.equal(q[:, :, :c], chain) and bool((q[:, :, c:] == 128).all())


@pytest.mark.parametrize("tile", [2, 4, 6])
@pytest.mark.parametrize("pattern", ["cook-toom", "dense", "own", "zero-scale"])
def test_the_output_transform_of_every_nonzero_pattern(tile, pattern):
    """The output transform's compiled forms (Cook-Toom's A^T or a dense one) and its tested
    form (another pattern, or a position scale of 0, which zeroes entries of the first pass's
    weights) against a float64 reference: A^T (M * scale) A per tile, cropped, plus the bias."""
    if not cpu_kernels.available():
        pytest.skip("the compiled CPU kernels could not be built here")
    ext = cpu_kernels.kernels()
    torch.manual_seed(tile)
    A_t = transform_matrices(tile)[0].clone()
    if pattern == "dense":
        A_t += torch.where(A_t == 0, 0.05, 0.01) * (1 + torch.rand_like(A_t))
    elif pattern == "own":
        A_t[1, 2] = 0.0
    A_t = A_t.contiguous()
    a, k, n, h, w = tile + 2, 21, 2, 13, 10
    th, tw = -(-h // tile), -(-w // tile)
    mp = torch.randn(a * a, n * th * tw, k)
    ps = torch.rand(a * a) + 0.5
    if pattern == "zero-scale":
        ps[3] = 0.0
    bias = torch.randn(k)
    for scale in (None, ps):
        out = torch.empty(n, h, w, k)
        ext.winograd_output(mp, A_t, bias, out, th, tw, 0, scale)
        m64 = mp.double().view(a, a, n, th, tw, k)
        if scale is not None:
            m64 = m64 * scale.double().view(a, a, 1, 1, 1, 1)
        y = torch.einsum("ri,ijntuk,sj->ntrusk", A_t.double(), m64, A_t.double())
        ref = y.reshape(n, th * tile, tw * tile, k)[:, :h, :w] + bias.double()
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tile", [2, 4, 6])
@pytest.mark.parametrize("size", [(5, 13, 11), (4, 57, 55)])  # (N, H, W): the second past 1 MiB
def test_the_fused_int8_product_and_output_transform_change_no_bit(tile, size):
    """winograd_q8_conv's fused form (the product of a block of tiles transformed from a buffer
    in cache) against its unfused form (the product written whole, then transformed): the same
    operations on the same values, so the same bits, for partial blocks, a cropped output, input
    channels padded to a multiple of 4, with and without bias, Cook-Toom's and a learned input
    transform, and any number of images per group (the fused form runs the batch in blocks of
    tiles, its input transform in the block too), on a small input and on one large enough for
    the input transform to prefetch."""
    if not cpu_kernels.available() or not cpu_kernels.kernels().q8_product_supported():
        pytest.skip("no AVX-512 VNNI build here")
    ext = cpu_kernels.kernels()
    torch.manual_seed(tile)
    A_t, G, B_t = transform_matrices(tile)
    n, h, w = size
    x = torch.randn(n, 22, h, w).relu().contiguous(memory_format=torch.channels_last)
    flex = _transform_of_pattern(tile, "dense")  # a learned B^T
    for bias, b_t in ((None, B_t), (torch.randn(40), B_t), (None, flex)):
        mod = WinogradConv(torch.randn(40, 22, 3, 3), bias, A_t, G, b_t, bits=8, act_amax=3.0)
        packed, sums, scales = mod._vnni_weights()
        scale, inv = mod._position_scales()
        xn = x.permute(0, 2, 3, 1)
        for chunk in (1, 2, 5):
            args = (xn, mod.B_t, mod.A_t, inv, scale, packed, sums, scales, 40, mod.bias, chunk)
            fused = ext.winograd_q8_conv(*args, fuse_product=True)
            plain = ext.winograd_q8_conv(*args, fuse_product=False)
            assert fused.shape == (n, h, w, 40)
            assert torch.equal(fused, plain)
        assert torch.equal(mod(x), fused.permute(0, 3, 1, 2))  # the module runs the fused form
    other = transform_matrices(4 if tile != 4 else 2)[2].contiguous()  # another tile's B^T
    with pytest.raises(RuntimeError, match="one tile size"):
        ext.winograd_q8_conv(xn, other, *args[2:])


@pytest.mark.parametrize("bits", [None, 8])
def test_the_kept_call_plan_follows_every_change_of_the_layer(bits):
    """WinogradConv keeps its call into the compiled kernels, arguments prepared, while the
    input's shape and the layer's buffers and form stay the same: a range or bias changed in
    place, weights loaded, another batch size, another product, the kernels switched off, each
    gives what a layer built with that state gives; and the module still copies and pickles."""
    if not cpu_kernels.available() or (bits and not int8_available()):
        pytest.skip("the compiled CPU kernels (or the int8 kernel) could not be built here")
    torch.manual_seed(11)
    A_t, G, B_t = transform_matrices(4)
    amax = torch.full((36,), 4.0)

    def layer(w, bias, act_amax=amax):
        mod = WinogradConv(w, bias, A_t, G, B_t, bits=bits, act_amax=act_amax if bits else None)
        mod.set_form("fused", 256)
        return mod

    w, bias, x = torch.randn(12, 8, 3, 3), torch.randn(12), torch.randn(2, 8, 9, 9).relu()
    mod = layer(w, bias)
    first = mod(x)
    # the plan runs this layer: float32, or 8-bit on the VNNI product (the oneDNN one loops)
    assert (mod._plan[1] is not None) == (not bits or mod.int8_product == "vnni")
    assert torch.equal(mod(x), first)
    with torch.no_grad():
        mod.bias.add_(1.0)
    assert torch.equal(mod(x), layer(w, bias + 1.0)(x))
    if bits:
        with torch.no_grad():
            mod.act_amax.mul_(2.0)
        assert torch.equal(mod(x), layer(w, bias + 1.0, amax * 2.0)(x))
    w2 = torch.randn(12, 8, 3, 3)
    other = layer(w2, torch.randn(12))
    with torch.no_grad():  # the Winograd-domain weights alone replaced in place
        for name in ("u_scales", "qu") if bits else ("u_t",):
            getattr(mod, name).copy_(getattr(other, name))
    assert torch.equal(mod(x), layer(w2, bias + 1.0, amax * 2.0)(x))
    mod.load_state_dict(other.state_dict())
    assert torch.equal(mod(x), other(x))
    x5 = torch.randn(5, 8, 9, 9).relu()
    assert torch.equal(mod(x5), other(x5))  # another batch: another plan
    mod.set_form("fused", None)
    assert torch.equal(mod(x5), other(x5))  # the whole batch in one group: same values here
    copied = copy.deepcopy(mod)
    assert torch.equal(copied(x5), mod(x5))
    assert torch.equal(pickle.loads(pickle.dumps(mod))(x5), mod(x5))
    with cpu_kernels.disabled():  # the torch operations, as a layer made now would run
        assert torch.equal(mod(x5), copy.deepcopy(other)(x5))
    if bits and mod.int8_product == "vnni":
        mod.int8_product = "onednn"
        assert mod(x5).shape == (5, 12, 9, 9) and mod._plan[1] is None


def test_int8_winograd_packed_weights_follow_loaded_weights():
    """The kernels' packed copies of the Winograd-domain weights (oneDNN's, the VNNI product's)
    are built from ``qu`` on first use and again when it changes: a layer that loads another's
    state computes what the other does, in every form; and where the VNNI product runs,
    oneDNN's copy is never built."""
    if not int8_available():
        pytest.skip("no int8 kernel here")
    torch.manual_seed(3)
    A_t, G, B_t = transform_matrices(4)
    x = torch.randn(2, 8, 9, 9).relu()
    for form in (("fused", 256), ("separable", None)):
        a = WinogradConv(torch.randn(12, 8, 3, 3), None, A_t, G, B_t, bits=8, act_amax=3.0)
        b = WinogradConv(torch.randn(12, 8, 3, 3), None, A_t, G, B_t, bits=8, act_amax=3.0)
        a.set_form(*form)
        b.set_form(*form)
        before = b(x)  # packs b's own weights
        b.load_state_dict(a.state_dict())
        assert torch.equal(b(x), a(x))
        assert not torch.equal(b(x), before)
    c = WinogradConv(torch.randn(12, 8, 3, 3), None, A_t, G, B_t, bits=8, act_amax=3.0)
    c.set_form("fused", 256)
    c(x)
    if c.int8_product == "vnni":
        assert getattr(c, "_onednn_for", None) is None
        assert getattr(c, "_vnni_for", None) is not None
