"""The fused CPU quantizer (wasearch/csrc/fake_quant.cpp) computes what the torch chain does,
bit for bit: values, integer levels, clip masks and gradients, on rounding ties, clipped values,
every bit-width, both granularities and strided inputs; and where it cannot be built, the
chain runs after one warning that says why. The Winograd-aware layer's fused 2-D transforms
compute the same sums as the GEMMs up to float rounding: checked against float64, on every
shape the layers use, partial blocks, kept levels, and any thread count giving the same bits."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import warnings

import pytest
import torch

from wasearch import cpu_kernels
from wasearch.layers import WinogradConv2d
from wasearch.quant import fake_quantize, grid_levels, qmax, quantize, rebuild
from wasearch.winograd_autograd import fused_transforms, transform_2d

HAS_TOOLCHAIN = shutil.which("c++") is not None and importlib.util.find_spec("ninja") is not None


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The IEEE bit patterns (so that -0.0 and 0.0 differ)."""
    return t.detach().contiguous().view(torch.int32)


def hard_input(shape, amax: float, bits: int, seed: int = 0) -> torch.Tensor:
    """Values spread past the range (clipped), and exact rounding ties of the grid."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g) * 2 - 1) * amax * 1.3
    flat = x.view(-1)
    step = amax / qmax(bits)
    k = torch.arange(min(200, flat.numel()), dtype=torch.float32)
    flat[: k.numel()] = (k - k.numel() / 2 + 0.5) * step  # ties: half-way between levels
    return x


@pytest.fixture
def fused():
    if not cpu_kernels.available():
        pytest.skip("the fused CPU kernels could not be built here (see the warning)")
    return cpu_kernels.kernels()


@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="no C++ compiler or ninja")
def test_the_kernels_build_where_a_compiler_is():
    assert cpu_kernels.available()


@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("codes", [False, True])
def test_values_levels_and_gradients_match_the_torch_chain(fused, bits, per_row, codes):
    shape = (6, 5, 37)  # rows that do not divide the kernel's chunks evenly
    amax = torch.rand(6) + 0.5 if per_row else torch.tensor(1.25)
    x = hard_input(shape, float(amax.max()), bits)
    axis = 0 if per_row else None
    g = torch.randn(shape)  # negative gradients where clipped: the chain gives -0.0 there
    out = {}
    for name in ("chain", "fused"):
        xi = x.clone().requires_grad_(True)
        if name == "chain":
            with cpu_kernels.disabled():
                q = quantize(xi, amax, bits, axis, codes=codes)
                q.values.backward(g)
        else:
            q = quantize(xi, amax, bits, axis, codes=codes)
            q.values.backward(g)
        out[name] = (q, xi.grad)
    (qc, gc), (qf, gf) = out["chain"], out["fused"]
    assert torch.equal(bits_of(qc.values), bits_of(qf.values))
    assert torch.equal(bits_of(gc), bits_of(gf))
    assert (gc == 0).any() and (gc != 0).any()  # some values clipped, some not
    if codes:
        assert qf.codes.dtype == qc.codes.dtype and torch.equal(qf.codes, qc.codes)
    else:
        assert qf.codes is None


def test_strided_inputs_take_the_chain_and_keep_their_gradients(fused):
    x = hard_input((8, 12, 10), 1.0, 8).transpose(0, 2)  # not contiguous
    g = torch.randn(x.shape)
    grads = []
    for off in (True, False):
        xi = x.detach().clone().transpose(0, 2).contiguous().transpose(0, 2).requires_grad_(True)
        assert not xi.is_contiguous()
        if off:
            with cpu_kernels.disabled():
                fake_quantize(xi, torch.tensor(0.8), 8).backward(g)
        else:
            fake_quantize(xi, torch.tensor(0.8), 8).backward(g)
        grads.append(xi.grad)
    assert torch.equal(bits_of(grads[0]), bits_of(grads[1]))


@pytest.mark.parametrize("bits", [8, 12])
@pytest.mark.parametrize("per_row", [False, True])
def test_levels_and_rebuild_match_the_torch_chain(fused, bits, per_row):
    scale = (torch.rand(4, 1, 1) + 0.1) / 100 if per_row else torch.tensor(0.013)
    top = qmax(bits)
    lv = torch.randint(-top, top + 1, (4, 9, 33))
    x = lv.float() * scale
    with cpu_kernels.disabled():
        chain_levels = grid_levels(x, scale, bits)
        chain_values = rebuild(chain_levels, scale, torch.float32)
    fused_levels = grid_levels(x, scale, bits)
    assert fused_levels.dtype == chain_levels.dtype and torch.equal(fused_levels, chain_levels)
    assert torch.equal(fused_levels.long(), lv)
    assert torch.equal(bits_of(rebuild(fused_levels, scale, torch.float32)), bits_of(chain_values))


@pytest.mark.parametrize(
    "mode,tile,gran,bits",
    [("flex", 4, "tap", 8), ("static", 2, "tensor", 8), ("flex", 6, "tensor", 12)],
)
def test_a_training_step_of_a_wa_layer_is_the_same(fused, mode, tile, gran, bits):
    def run(off: bool):
        torch.manual_seed(0)
        layer = WinogradConv2d(8, 6, tile, mode=mode, bits=bits, granularity=gran)
        x = torch.randn(3, 8, 11, 9, requires_grad=True)
        for _ in range(2):  # the second step runs with a running range already folded
            # The transforms' kernel sums in another order (tested below), the product on the
            # levels exactly (tests/test_grid_product.py): both off in both runs.
            parts = ("transforms", "grid_product")
            with cpu_kernels.disabled() if off else cpu_kernels.disabled(*parts):
                y = layer(x)
                y.square().sum().backward()
        grads = [p.grad for p in layer.parameters()] + [x.grad]
        return y, grads

    (y0, g0), (y1, g1) = run(True), run(False)
    assert torch.equal(bits_of(y0), bits_of(y1))
    for a, b in zip(g0, g1, strict=True):
        assert torch.equal(bits_of(a), bits_of(b))


def test_a_failed_build_warns_once_and_the_chain_runs(monkeypatch):
    def broken():
        raise OSError("c++: command not found\nninja: build stopped")

    monkeypatch.setattr(cpu_kernels, "_build", broken)
    monkeypatch.setattr(cpu_kernels, "_state", {"module": None, "tried": False})
    x = hard_input((4, 50), 1.0, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = fake_quantize(x, torch.tensor(1.0), 8)
        fake_quantize(x, torch.tensor(1.0), 8)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "could not be built" in messages[0] and "ninja: build stopped" in messages[0]
    assert "\n" not in messages[0]
    with cpu_kernels.disabled():
        assert torch.equal(y, fake_quantize(x, torch.tensor(1.0), 8))


def test_switched_off_by_the_environment_and_by_the_context(monkeypatch):
    monkeypatch.setenv("WASEARCH_FUSED_KERNELS", "0")
    assert cpu_kernels.kernels() is None
    monkeypatch.delenv("WASEARCH_FUSED_KERNELS")
    with cpu_kernels.disabled():
        assert cpu_kernels.kernels() is None
        with cpu_kernels.disabled():
            assert cpu_kernels.kernels() is None
        assert cpu_kernels.kernels() is None


# ---- the 2-D transforms ----

# (p, a) of B^T (p = alpha) and A^T (p = alpha - 2) for F2, F4, F6, and of G (p = alpha, a = 3).
SHAPES = [(a - d, a) for a in (4, 6, 8) for d in (0, 2)] + [(a, 3) for a in (4, 6, 8)]
# Partial vectors (8 tiles on AVX2, 16 on AVX-512) and partial chunks (512 tiles).
COUNTS = [1, 7, 8, 9, 15, 16, 17, 511, 512, 513, 1500]


def _reference(mat, tiles, grad):
    """Output and gradients (tiles, mat) of kron(mat, mat) @ tiles in float64."""
    m = mat.double().requires_grad_(True)
    t = tiles.double().requires_grad_(True)
    out = torch.kron(m, m) @ t
    out.backward(grad.double())
    return out.detach(), t.grad, m.grad


def _fused(mat, tiles, grad):
    m = mat.clone().requires_grad_(True)
    t = tiles.clone().requires_grad_(True)
    out = transform_2d(m, t)
    out.backward(grad)
    return out.detach(), t.grad, m.grad


def _close(a, ref, rel=2e-6):
    """float32 against float64: within a few float32 roundings of the largest term."""
    err = (a.double() - ref).abs().max().item()
    assert err <= rel * max(ref.abs().max().item(), 1e-30) * 8, err


@pytest.mark.parametrize("p,a", SHAPES)
def test_transforms_match_float64(fused, p, a):
    assert fused.transform2d_supports(p, a)
    g = torch.Generator().manual_seed(p * 10 + a)
    for count in COUNTS:
        mat = torch.randn(p, a, generator=g)
        tiles = torch.randn(a * a, count, generator=g)
        grad = torch.randn(p * p, count, generator=g)
        assert fused_transforms(mat, tiles) is fused
        out, d_tiles, d_mat = _fused(mat, tiles, grad)
        ref_out, ref_tiles, ref_mat = _reference(mat, tiles, grad)
        _close(out, ref_out)
        _close(d_tiles, ref_tiles)
        # d mat sums count * alpha^2 products: float32 rounding grows with the sum
        _close(d_mat, ref_mat, rel=2e-6 * max(1.0, count / 512))


def test_transforms_are_what_the_layer_runs(fused, monkeypatch):
    calls = []
    names = ("transform2d", "transform2d_backward", "gather_tiles", "scatter_tiles")
    for name in names:
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    layer = WinogradConv2d(4, 4, 4, mode="flex", bits=8)
    layer(torch.randn(2, 4, 9, 9, requires_grad=True)).sum().backward()
    # G, B^T (reading the input's tiles in place: no gather) and A^T, forward and backward
    assert sorted(calls) == ["transform2d"] * 3 + ["transform2d_backward"] * 3
    calls.clear()
    with cpu_kernels.disabled("transforms"):
        layer(torch.randn(2, 4, 9, 9, requires_grad=True)).sum().backward()
    assert calls == ["gather_tiles", "scatter_tiles"]


@pytest.mark.parametrize(
    "dtype,per_row", [(torch.int8, False), (torch.int8, True), (torch.int16, True)]
)
def test_transform_gradient_reads_kept_levels_exactly(fused, dtype, per_row):
    """The backward given the levels the forward kept equals the backward given their values."""
    p, a, count = 6, 6, 777
    top = 127 if dtype == torch.int8 else 2047
    levels = torch.randint(-top, top + 1, (a * a, count), dtype=dtype)
    scale = torch.rand(a * a) + 0.01 if per_row else torch.tensor([0.013])
    values = levels.float() * (scale.view(-1, 1) if per_row else scale)
    mat, grad = torch.randn(p, a), torch.randn(p * p, count)
    none = torch.empty(0)
    _, from_levels = fused.transform2d_backward(mat, levels, scale, grad, False, True)
    _, from_values = fused.transform2d_backward(mat, values, none, grad, False, True)
    assert torch.equal(bits_of(from_levels), bits_of(from_values))


def test_transforms_give_the_same_bits_on_any_thread_count(fused):
    mat, tiles, grad = torch.randn(6, 6), torch.randn(36, 20000), torch.randn(36, 20000)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(_fused(mat, tiles, grad))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for x, y in zip(runs[0], other, strict=True):
            assert torch.equal(bits_of(x), bits_of(y))


@pytest.mark.parametrize("m,h,w", [(4, 16, 16), (4, 13, 10), (2, 7, 9), (6, 11, 12)])
def test_the_output_transform_untiles_in_place_of_a_permuted_copy(fused, m, h, w):
    """With ``untile``, the output transform writes N x K x H x W (overhanging tile outputs
    dropped) and reads its gradient so: the same bits as the position-major kernel followed by
    the torch untiling, and the gradient as that of the position-major kernel given the
    gradient tiled, zeros where the tiles overhang."""
    a, n, k = m + 2, 3, 5
    th, tw = -(-h // m), -(-w // m)
    count = k * n * th * tw
    g = torch.Generator().manual_seed(m * 100 + h)
    mat, tiles = torch.randn(m, a, generator=g), torch.randn(a * a, count, generator=g)
    geometry = [n, k, h, w, th, tw]
    flat = fused.transform2d(mat, tiles)
    full = flat.reshape(m, m, k, n, th, tw).permute(3, 2, 4, 0, 5, 1)
    full = full.reshape(n, k, th * m, tw * m)
    y = fused.transform2d(mat, tiles, geometry)
    assert y.shape == (n, k, h, w)
    assert torch.equal(bits_of(y), bits_of(full[:, :, :h, :w].contiguous()))

    grad = torch.randn(n, k, h, w, generator=g)
    padded = torch.zeros(n, k, th * m, tw * m)
    padded[:, :, :h, :w] = grad
    tiled = padded.reshape(n, k, th, m, tw, m).permute(3, 5, 1, 0, 2, 4).reshape(m * m, count)
    none = torch.empty(0)
    got = fused.transform2d_backward(mat, tiles, none, grad, True, True, geometry)
    want = fused.transform2d_backward(mat, tiles, none, tiled.contiguous(), True, True)
    for x, ref in zip(got, want, strict=True):
        assert torch.equal(bits_of(x), bits_of(ref))
    with pytest.raises(RuntimeError, match="untile geometry"):
        fused.transform2d(mat, tiles, [n, k, h, w, th, tw + 1])


# (m, N, C, H, W): crops, planes of one tile (many to a chunk), and planes of more tiles than a
# chunk (F2 at 50 x 50: 625) so that a chunk is one plane.
WINDOWS = [(2, 2, 3, 7, 5), (4, 3, 2, 9, 12), (6, 1, 5, 13, 6), (4, 5, 7, 1, 1), (2, 1, 2, 50, 50)]


def _reference_window(mat, x, grad, m):
    """Output and gradients (x, mat) of B^T d B over the layer's tiles of x, in float64."""
    a = m + 2
    n, c, h, w = x.shape
    th, tw = -(-h // m), -(-w // m)
    xd = x.double().requires_grad_(True)
    md = mat.double().requires_grad_(True)
    padded = torch.nn.functional.pad(xd, (1, tw * m + 1 - w, 1, th * m + 1 - h))
    cols = torch.nn.functional.unfold(padded, a, stride=m)  # (N, C*a2, T)
    tiles = cols.view(n, c, a * a, th * tw).permute(2, 1, 0, 3).reshape(a * a, -1)
    out = torch.kron(md, md) @ tiles
    out.backward(grad.double())
    return out.detach(), xd.grad, md.grad


@pytest.mark.parametrize("m,n,c,h,w", WINDOWS)
def test_the_input_transform_reads_its_tiles_in_place(fused, m, n, c, h, w):
    """With ``window``, B^T reads the layer's input itself: the same output bits as gathering
    its tiles first, the input's gradient and the matrix's within float rounding of float64,
    the same from the input's levels as from its values, on any thread count."""
    a = m + 2
    th, tw = -(-h // m), -(-w // m)
    geometry = [n, c, h, w, th, tw]
    g = torch.Generator().manual_seed(m * 1000 + h * 10 + w)
    mat = torch.randn(a, a, generator=g)
    levels = torch.randint(-127, 128, (n, c, h, w), dtype=torch.int8, generator=g)
    scale = torch.tensor([0.037])
    x = levels.float() * scale
    tiles = fused.gather_tiles(x, a, m, th, tw).reshape(a * a, -1)
    out = fused.transform2d(mat, x, [], geometry)
    assert torch.equal(bits_of(out), bits_of(fused.transform2d(mat, tiles)))

    grad = torch.randn(a * a, tiles.shape[1], generator=g)
    none = torch.empty(0)
    ref_out, ref_x, ref_mat = _reference_window(mat, x, grad, m)
    _close(out, ref_out)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(fused.transform2d_backward(mat, x, none, grad, True, True, [], geometry))
    finally:
        torch.set_num_threads(before)
    d_x, d_mat = runs[0]
    assert d_x.shape == x.shape
    _close(d_x, ref_x)
    _close(d_mat, ref_mat, rel=2e-6 * max(1.0, tiles.shape[1] / 512))
    for other in runs[1:]:
        for got, want in zip(other, runs[0], strict=True):
            assert torch.equal(bits_of(got), bits_of(want))
    for kept in (levels, levels.to(torch.int16)):
        _, from_levels = fused.transform2d_backward(
            mat, kept, scale, grad, False, True, [], geometry
        )
        assert torch.equal(bits_of(from_levels), bits_of(d_mat))


@pytest.mark.parametrize("mode", ["flex", "static"])
@pytest.mark.parametrize("tile,gran,bits", [(4, "tensor", 8), (2, "tap", 8), (6, "tap", 12)])
@pytest.mark.parametrize("train", [True, False])
def test_the_product_quantized_into_the_output_transform_is_the_same(
    fused, monkeypatch, mode, tile, gran, bits, train
):
    """The product's quantizer and the output transform as one step (levels, no values): the
    same outputs, gradients and running ranges, bit for bit, over two steps, as quantizing to
    values first."""
    from wasearch import winograd

    real = winograd.fused_product_output
    taken = []

    def fusing(*args):
        q = real(*args)
        taken.append(q is not None)
        return q

    def run(fuse: bool):
        monkeypatch.setattr(
            winograd, "fused_product_output", fusing if fuse else (lambda *a: None)
        )
        torch.manual_seed(0)
        layer = WinogradConv2d(6, 5, tile, mode=mode, bits=bits, granularity=gran).train(train)
        x = torch.randn(3, 6, 11, 13, requires_grad=True)
        got = []
        for _ in range(2):
            y = layer(x)
            y.square().sum().backward()
            got.append(y.detach())
        grads = [p.grad for p in layer.parameters() if p.grad is not None]
        return got + grads + [x.grad] + [b.clone() for b in layer.buffers()]

    fused_run = run(True)
    assert taken == [True, True]  # both steps took the fused path
    reference = run(False)
    assert len(fused_run) == len(reference)
    for a, b in zip(fused_run, reference, strict=True):
        if a.dtype == torch.float32:
            assert torch.equal(bits_of(a), bits_of(b))
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "m,n,c,h,w", [(2, 2, 3, 9, 17), (4, 1, 2, 18, 35), (2, 3, 1, 16, 16), (4, 2, 2, 7, 30)]
)
def test_the_input_gradient_adds_tiles_in_increasing_order(fused, m, n, c, h, w):
    """d x from the windows is each pixel's sum over the tiles that cover it, added in
    increasing tile order (the vector form for rows of 4 tiles and more included): bit for bit
    the float32 sums of adding every tile's gradient in turn."""
    a = m + 2
    th, tw = -(-h // m), -(-w // m)
    g = torch.Generator().manual_seed(h * w + m)
    mat = torch.randn(a, a, generator=g)
    grad = torch.randn(a * a, n * c * th * tw, generator=g)
    none = torch.empty(0)
    d_x, _ = fused.transform2d_backward(
        mat, none, none, grad, True, False, [], [n, c, h, w, th, tw]
    )
    d_tiles, _ = fused.transform2d_backward(mat, none, none, grad, True, False)  # same per tile
    padded = torch.zeros(n, c, th * m + 2, tw * m + 2)  # one pixel of padding up and left
    for index in range(n * c * th * tw):
        tj, rest = index % tw, index // tw
        ti, plane = rest % th, rest // th
        ch, img = plane // n, plane % n
        padded[img, ch, ti * m : ti * m + a, tj * m : tj * m + a] += d_tiles[:, index].view(a, a)
    assert torch.equal(bits_of(d_x), bits_of(padded[:, :, 1 : h + 1, 1 : w + 1].contiguous()))


def test_an_input_window_that_does_not_fit_its_tiles_is_refused(fused):
    x, mat = torch.randn(2, 3, 9, 9), torch.randn(6, 6)
    with pytest.raises(RuntimeError, match="must just cover"):
        fused.transform2d(mat, x, [], [2, 3, 9, 9, 2, 2])  # 2 tiles of 4 miss the last row
    with pytest.raises(RuntimeError, match="as window says"):
        fused.transform2d(mat, x, [], [2, 3, 8, 9, 2, 3])
    with pytest.raises(RuntimeError, match="exclude each other"):
        fused.transform2d(mat, x, [2, 3, 9, 9, 3, 3], [2, 3, 9, 9, 3, 3])


def test_transform_shapes_outside_the_kernels_take_torch(fused):
    # An odd tile (F3: alpha 5) and p = alpha - 3, which no layer has.
    assert not fused.transform2d_supports(5, 5) and not fused.transform2d_supports(3, 5)
    mat, tiles = torch.randn(3, 6), torch.randn(36, 40)
    assert not fused.transform2d_supports(3, 6)
    assert fused_transforms(mat, tiles) is None
    assert fused_transforms(mat.double(), tiles.double()) is None
    torch.testing.assert_close(transform_2d(mat, tiles), torch.kron(mat, mat) @ tiles)
    with pytest.raises(RuntimeError, match="unsupported matrix shape"):
        fused.transform2d(mat, tiles)


@pytest.mark.parametrize(
    "mode,tile,gran", [("flex", 4, "tap"), ("static", 6, "tensor"), ("flex", 2, "tensor")]
)
def test_a_training_step_with_fused_transforms_differs_only_by_rounding(fused, mode, tile, gran):
    def run(off: bool):
        torch.manual_seed(0)
        layer = WinogradConv2d(8, 6, tile, mode=mode, bits=8, granularity=gran)
        x = torch.randn(4, 8, 16, 13, requires_grad=True)
        with cpu_kernels.disabled("transforms") if off else contextlib.nullcontext():
            y = layer(x)
            y.square().sum().backward()
        return y.detach(), [p.grad for p in layer.parameters()] + [x.grad]

    (y0, g0), (y1, g1) = run(True), run(False)
    step = y0.abs().max() / 127
    diff = (y1 - y0).abs()
    assert (diff > 1e-3 * step).float().mean() < 0.01  # almost every value identical
    assert diff.max() <= 2 * step + 1e-6  # the rest: a flip to a neighbouring level
    for a, b in zip(g0, g1, strict=True):
        assert (a - b).abs().max() <= 0.02 * a.abs().max()


def test_disabling_an_unknown_part_is_an_error():
    with pytest.raises(ValueError, match="unknown kernel part"):
        with cpu_kernels.disabled("tranforms"):
            pass
