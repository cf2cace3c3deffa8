"""The torch reference against closed forms and hand-computed cases."""

import math

import pytest
import torch

from entrodrop_fast.ops import reference as R


def test_bucket_hand_computed():
    # 4 tokens, bins=2: channel 0 values {0, 1, 2, 3} -> bins [0,0,1,1] (3 == max goes last)
    x = torch.tensor([[0.0, 5.0], [1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    h = R.bucket(x[None], bins=2)[0]
    assert h[0].item() == pytest.approx(math.log(2))
    assert h[1].item() == 0.0  # min == max: one bin, entropy 0


def test_bucket_value_equal_to_max_goes_in_last_bin():
    x = torch.tensor([[0.0], [10.0]])
    idx = R.bucket_bin_index(x, 10)
    assert idx.flatten().tolist() == [0, 9]


def test_bucket_even_spread_is_log_bins():
    n, bins = 1000, 20
    x = torch.linspace(0, 1, n).unsqueeze(1).repeat(1, 3)  # evenly spread values
    h = R.bucket(x[None], bins=bins)[0]
    # 1000 evenly spaced values in 20 bins: 50 per bin -> ln 20 (up to boundary rounding)
    assert torch.allclose(h, torch.full_like(h, math.log(bins)), atol=1e-3)


def test_bucket_paper_exact_adds_clamp_for_empty_bins():
    x = torch.tensor([[0.0], [0.0], [1.0], [1.0]])  # 2 bins used of 5
    plain = R.bucket(x[None], bins=5)[0, 0].item()
    exact = R.bucket(x[None], bins=5, paper_exact=True)[0, 0].item()
    assert plain == pytest.approx(math.log(2))
    assert exact - plain == pytest.approx(3 * (-1e-10 * math.log(1e-10)), rel=1e-6)


def test_onehot_reference_equals_paper_exact_bucket():
    x = torch.randn(300, 17)
    # the paper's formulation sums probabilities in fp32, hence the 1e-6 tolerance
    assert R.bucket_onehot_reference(x, 20).item() == pytest.approx(
        R.bucket(x[None], bins=20, paper_exact=True).sum().item(), rel=1e-6
    )


def test_gaussian_closed_forms():
    torch.manual_seed(0)
    D = 4
    A = torch.randn(D, D, dtype=torch.float64)
    cov = A @ A.T + D * torch.eye(D, dtype=torch.float64)
    L = torch.linalg.cholesky(cov)
    z = torch.randn(200_000, D, dtype=torch.float64)
    z = (z - z.mean(0)) @ torch.linalg.inv(
        torch.linalg.cholesky(z.T.cov(correction=0))
    ).T  # whiten exactly
    x = (z @ L.T).float()
    expected_full = 0.5 * (D * math.log(2 * math.pi * math.e) + torch.logdet(cov).item())
    assert R.gaussian_full_entropy_1(x).item() == pytest.approx(expected_full, rel=1e-5)
    expected_diag = 0.5 * torch.log(2 * math.pi * math.e * cov.diagonal()).sum().item()
    assert R.gaussian_diag_entropy_1(x).item() == pytest.approx(expected_diag, rel=1e-5)


def test_covariance_survives_large_offsets():
    x = torch.randn(1000, 3, dtype=torch.float64)
    truth = x.T.cov(correction=0)
    shifted = (x + torch.tensor([1e4, 0.0, -3e3], dtype=torch.float64)).float()
    c = R.covariance(shifted)
    assert torch.allclose(c, truth, atol=5e-3)  # fp32 input rounding only


def test_knn_matches_closed_form_for_uniform():
    # KL estimate of a uniform on [0,1]^2 (true entropy 0) with the digamma form
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4000, 2, generator=g)
    h = R.knn_entropy_1(x, k=5, form="digamma").item()
    assert abs(h) < 0.05
    # and of a standard 2-D normal: ln(2 pi e)
    y = torch.randn(4000, 2, generator=g)
    assert R.knn_entropy_1(y, k=5, form="digamma").item() == pytest.approx(
        math.log(2 * math.pi * math.e), abs=0.06
    )


def test_knn_kth_distance_small():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert R.knn_kth_distance(x, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert R.knn_kth_distance(x, 2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_renyi_three_points_by_hand():
    # 1-D values 0, 1, 3: z-scored distances are |diff| / std. The 9 ordered pairs have
    # distances (0, 0, 0, 1, 1, 2, 2, 3, 3) / std; torch's median of an even or odd count is
    # the lower middle, here 1 / std = sigma. So d / sigma = |diff| and K = exp(-diff^2 / 2).
    x = torch.tensor([[0.0], [1.0], [3.0]])
    alpha = 4.0
    k3 = [1.0, 1.0, 1.0] + [math.exp(-3 * d * d / 2) for d in (1, 1, 2, 2, 3, 3)]  # K^(alpha-1)
    expected = math.log(sum(k3) / 9) / (1 - alpha)
    assert R.renyi_entropy_1(x, alpha).item() == pytest.approx(expected, rel=1e-9)


def test_moments_and_mask():
    x = torch.randn(2, 7, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1], [1] * 7], dtype=torch.bool)
    m = R.moments(x, None, mask)
    rows = x[0][mask[0]].double()
    assert m["count"].tolist() == [5.0, 7.0]
    assert torch.allclose(m["mean"][0], rows.mean(0))
    assert torch.allclose(m["m2"][0], rows.var(0, unbiased=False) * 5)
    assert torch.equal(m["max"][0], x[0][mask[0]].amax(0))


def test_cosine_reference():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    s, n = R.cosine(x, torch.tensor([[[0.0, 1.0], [0.0, 3.0]]]), None, fused=False)
    assert s.item() == pytest.approx(1.0) and n.item() == 2.0
    s, n = R.cosine(x, -x, None, fused=True)  # Y = 0: cos defined as 0 via the eps floor
    assert s.item() == 0.0
