from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from wasearch.winograd import cook_toom, default_points, transform_matrices, winograd_conv2d

POINTS = {3: [0, 1, -1, 2], 5: [0, 1, -1, 2, -2, "1/2"]}


@pytest.mark.parametrize("m", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("size", [(11, 13), (7, 5), (8, 8)])
def test_static_winograd_equals_conv2d_float64(m, size):
    torch.manual_seed(m)
    A_t, G, B_t = transform_matrices(m, 3, POINTS.get(m), dtype=torch.float64)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    got = winograd_conv2d(x, w, A_t, G, B_t, bias=b)
    torch.testing.assert_close(got, F.conv2d(x, w, b, padding=1), rtol=0, atol=1e-10)


def test_one_dimensional_exact_rationals():
    # y = A^T [(G g) * (B^T d)] is the correlation of d with g, exactly, for every default m.
    for m in (2, 4, 6):
        ct = cook_toom(m)
        d = [Fraction(i * i - 3 * i + 1) for i in range(ct.alpha)]
        g = [Fraction(2), Fraction(-1, 3), Fraction(5)]
        gg = [sum(ct.G[i][k] * g[k] for k in range(3)) for i in range(ct.alpha)]
        dd = [sum(ct.B_t[i][t] * d[t] for t in range(ct.alpha)) for i in range(ct.alpha)]
        y = [sum(ct.A_t[j][i] * gg[i] * dd[i] for i in range(ct.alpha)) for j in range(m)]
        assert y == [sum(g[k] * d[j + k] for k in range(3)) for j in range(m)]


def test_default_points_documented_sets():
    assert default_points(2) == (0, 1, -1)
    assert default_points(4) == (0, 1, -1, 2, -2)
    assert default_points(6) == (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2))
    assert [t.shape for t in transform_matrices(4)] == [(4, 6), (6, 3), (6, 6)]


def test_f2_matches_the_well_known_matrices_up_to_row_signs():
    A_t, G, B_t = transform_matrices(2, dtype=torch.float64)
    known_bt = torch.tensor(
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64
    )
    # Row scalings may differ between constructions; the products G[i] * B_t[i] may not.
    known_g = torch.tensor(
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64
    )
    for i in range(4):
        torch.testing.assert_close(
            torch.outer(G[i], B_t[i]).abs(), torch.outer(known_g[i], known_bt[i]).abs()
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"m": 4, "points": [0, 1, -1]}, "needs 5 finite"),
        ({"m": 2, "points": [0, 1, 1]}, "distinct"),
        ({"m": 9}, "not supported"),
        ({"m": 2, "points": [0, 1, "x"]}, "not rationals"),
    ],
)
def test_bad_points_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cook_toom(**kwargs)


def test_other_tiles_from_user_points():
    A_t, G, B_t = transform_matrices(3, 3, [0, 1, -1, "1/2"], dtype=torch.float64)
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(winograd_conv2d(x, w, A_t, G, B_t), F.conv2d(x, w, padding=1))
