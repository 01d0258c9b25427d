import pytest
import torch

from wasearch.quant import FakeQuantize, check_bits, fake_quantize, qmax


@pytest.mark.parametrize("bits", [2, 4, 8, 10, 16])
def test_outputs_lie_on_the_grid_and_match_torch(bits):
    torch.manual_seed(bits)
    x = (torch.randn(4000) * 3).requires_grad_(True)
    amax = torch.tensor(2.5)
    y = fake_quantize(x, amax, bits)
    scale = 2.5 / qmax(bits)
    levels = y.detach() / scale
    # float32 rounding of level * scale / scale: relative 1e-7 of the level
    assert ((levels - levels.round()).abs() <= 1e-4 + 2e-7 * qmax(bits)).all()
    assert levels.abs().max() <= qmax(bits)
    ref = torch.fake_quantize_per_tensor_affine(x.detach(), scale, 0, -qmax(bits), qmax(bits))
    torch.testing.assert_close(y.detach(), ref)
    # Straight-through inside the range, zero where clipped.
    y.sum().backward()
    inside = (x.detach() / scale).round().abs() <= qmax(bits)
    assert torch.equal(x.grad, inside.float())
    assert 0 < inside.sum() < x.numel()


def test_running_range_momentum_and_first_batch():
    q = FakeQuantize(8)
    q.train()
    q(torch.tensor([-1.0, 2.0]))
    assert q.min_val.item() == -1.0 and q.max_val.item() == 2.0
    q(torch.tensor([-3.0, 4.0]))
    assert q.min_val.item() == pytest.approx(-1.0 * 0.99 - 3.0 * 0.01)
    assert q.max_val.item() == pytest.approx(2.0 * 0.99 + 4.0 * 0.01)
    q.eval()
    before = (q.min_val.clone(), q.max_val.clone())
    q(torch.tensor([-100.0, 100.0]))
    assert torch.equal(before[0], q.min_val) and torch.equal(before[1], q.max_val)


def test_eval_clips_to_stored_range():
    q = FakeQuantize(8)
    q(torch.tensor([-1.0, 1.0]))
    q.eval()
    assert q(torch.tensor([5.0])).item() == pytest.approx(1.0)


def test_loading_a_state_dict_refreshes_whether_a_range_is_held():
    # The quantizer keeps a host-side copy of its `initialized` buffer (no device sync per
    # call); a loaded state must replace it, in both directions.
    trained = FakeQuantize(8)
    trained(torch.tensor([-2.0, 2.0]))
    empty_state = FakeQuantize(8).state_dict()

    q = FakeQuantize(8)
    q.load_state_dict(trained.state_dict())
    q.eval()
    assert q(torch.tensor([5.0])).item() == pytest.approx(2.0)  # the loaded range clips

    q.load_state_dict(empty_state)
    q.train()
    q(torch.tensor([-7.0, 7.0]))  # no range any more: this batch's is taken as is
    assert q.max_val.item() == 7.0 and bool(q.initialized)

    q.reset_range()
    assert not q.is_initialized and not bool(q.initialized)
    q(torch.tensor([-1.0, 1.0]))
    assert q.max_val.item() == 1.0


def test_bits_none_is_identity_and_weight_mode_uses_own_range():
    x = torch.randn(10)
    assert FakeQuantize(None)(x) is x
    w = FakeQuantize(4, running=False)
    y = w(x)
    assert y.abs().max() == pytest.approx(x.abs().max().item())
    assert not hasattr(w, "min_val")


@pytest.mark.parametrize("bits", [1, 17, 8.0, True, "8"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        check_bits(bits)
