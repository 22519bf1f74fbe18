"""prune/fit.py: the LASSO Gram matrix, LASSO channel selection and the least-squares refit."""

from __future__ import annotations

import numpy as np
import torch

from resnet_imagenet.prune import fit as S


def _relative_error(x, y, keep, kk, w, b) -> float:
    """||X[:, kept] W^T + b - Y|| / ||Y|| over the given points."""
    return float((S.predict(x, keep, kk, w, b) - y).norm() / y.norm())


def test_lasso_gram_equals_explicit_z():
    g = torch.Generator().manual_seed(0)
    x, w, y = torch.randn(30, 4 * 9, generator=g), torch.randn(5, 4, 3, 3, generator=g), torch.randn(30, 5, generator=g)
    z = torch.einsum("pck,ock->poc", x.double().view(30, 4, 9), w.double().view(5, 4, 9)).reshape(-1, 4)
    gram, zy = S.lasso_gram(x, y, w)
    np.testing.assert_allclose(gram, (z.T @ z).numpy(), rtol=1e-10)
    np.testing.assert_allclose(zy, (z.T @ y.double().reshape(-1)).numpy(), rtol=1e-10)


def test_lasso_finds_the_channels_that_produce_the_output_and_least_squares_refits_them():
    g = torch.Generator().manual_seed(1)
    cin, kk, cout = 12, 9, 6
    x = torch.randn(400, cin * kk, generator=g)
    w = torch.randn(cout, cin, 3, 3, generator=g)
    used = np.array([1, 4, 5, 10])
    w_true = torch.zeros_like(w)
    w_true[:, used] = w[:, used] * torch.linspace(0.5, 2, 4).view(1, 4, 1, 1)  # refit must rescale them
    y = x @ w_true.reshape(cout, -1).T
    keep = S.lasso_select(x, y, w, 4)
    assert keep.tolist() == used.tolist()
    w_new, b_new = S.reconstruct(x, y, keep, kk, has_bias=False)
    assert b_new is None
    torch.testing.assert_close(w_new, w_true[:, used].reshape(cout, -1), atol=1e-4, rtol=1e-4)
    assert _relative_error(x, y, keep, kk, w_new, None) < 1e-5
    assert _relative_error(x, y, keep, kk, w[:, used].reshape(cout, -1), None) > 0.1


def test_lasso_on_all_zero_features_keeps_k_channels():
    x, y, w = torch.zeros(20, 6), torch.zeros(20, 3), torch.randn(3, 6, 1, 1)
    assert S.lasso_select(x, y, w, 2).tolist() == [0, 1]  # (its penalty search would start at alpha 0)
