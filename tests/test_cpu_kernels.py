"""The fused CPU quantizer (wasearch/csrc/fake_quant.cpp) computes what the torch chain does,
bit for bit: values, integer levels, clip masks and gradients, on rounding ties, clipped values,
every bit-width, both granularities and strided inputs; and where it cannot be built, the
chain runs after one warning that says why."""

from __future__ import annotations

import importlib.util
import shutil
import warnings

import pytest
import torch

from wasearch import cpu_kernels
from wasearch.layers import WinogradConv2d
from wasearch.quant import fake_quantize, grid_levels, qmax, quantize, rebuild

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
            if off:
                with cpu_kernels.disabled():
                    y = layer(x)
                    y.square().sum().backward()
            else:
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
