"""Channel pruning's numerics: LASSO channel selection and the least-squares refit.

(He, Zhang & Sun, "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017, eq. 1-3.)
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from resnet_imagenet.prune.sample import Samples


def lasso_gram(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """G = Z^T Z and Z^T y for Z[:, c] = (output of channel c alone), flattened over points and outputs.

    G[c, c'] = sum_{k, k'} (X_k^T X_k')[c, c'] * (W_k^T W_k')[c, c'] with X_k the patches' k-th kernel tap.
    """
    npts, cout = y.shape
    kk = w[0, 0].numel()
    cin = x.shape[1] // kk
    x3 = x.double().view(npts, cin, kk)
    w3 = w.double().reshape(cout, cin, kk)
    x2, w2 = x3.reshape(npts, -1), w3.reshape(cout, -1)
    g = torch.zeros(cin, cin, dtype=torch.float64)
    for a in range(kk):  # one kernel tap against all: (C x C*K) blocks keep memory at C^2 K
        g += ((x3[:, :, a].T @ x2) * (w3[:, :, a].T @ w2)).view(cin, cin, kk).sum(2)
    zy = ((x2.T @ y.double()) * w2.T).view(cin, kk, cout).sum((1, 2))
    return g.numpy(), zy.numpy()


def lasso_select(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, k: int) -> np.ndarray:
    """Indices (sorted) of the ``k`` input channels LASSO keeps, bisecting the penalty as the paper does."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso

    g, zy = lasso_gram(x, y, w)
    cin = g.shape[0]
    if k >= cin:
        return np.arange(cin)
    if not np.abs(zy).max() > 0:  # no channel explains any output (e.g. all-zero features): by energy
        return np.sort(np.argsort(-np.diag(g), kind="stable")[:k])
    # Any R with R^T R = G and R^T t = Z^T y gives the same LASSO objective up to a constant.
    lam, v = np.linalg.eigh(g)
    keep = lam > lam.max() * 1e-12
    r = np.sqrt(lam[keep])[:, None] * v[:, keep].T
    t = (v[:, keep].T @ zy) / np.sqrt(lam[keep])
    alpha_max = np.abs(zy).max() / r.shape[0]  # sklearn scales the squared error by 1 / (2 rows)
    model = Lasso(fit_intercept=False, warm_start=True, max_iter=5000, tol=1e-6)
    lo, hi = math.log(alpha_max * 1e-7), math.log(alpha_max)
    over = None  # the sparsest solution seen that keeps more than k channels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(40):
            model.set_params(alpha=math.exp((lo + hi) / 2))
            coef = model.fit(r, t).coef_.copy()
            nz = int(np.count_nonzero(coef))
            if nz == k:
                return np.sort(np.flatnonzero(coef))
            if nz > k:
                lo, over = (lo + hi) / 2, coef
            else:
                hi = (lo + hi) / 2
    if over is None:  # fewer than k useful channels: fill up by the channels' own energy
        over = np.abs(coef) * 1e6 + np.diag(g) / max(np.diag(g).max(), 1e-30)
    return np.sort(np.argsort(-np.abs(over), kind="stable")[:k])


def l1_select(a_weight: torch.Tensor, k: int) -> np.ndarray:
    """The baseline: keep the ``k`` filters of the previous conv with the largest L1 norms."""
    norms = a_weight.detach().abs().flatten(1).sum(1).cpu().numpy()
    return np.sort(np.argsort(-norms, kind="stable")[:k])


def reconstruct(
    x: torch.Tensor, y: torch.Tensor, keep: np.ndarray, kk: int, has_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares weights (out, kept * kh * kw) and bias so that X[:, kept] W^T + b ~ Y."""
    cols = torch.from_numpy((keep[:, None] * kk + np.arange(kk)[None]).reshape(-1))
    a = x[:, cols].double()
    if has_bias:
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
    sol = torch.linalg.lstsq(a, y.double(), driver="gelsy").solution.T  # out, cols (+1)
    if has_bias:
        return sol[:, :-1].float(), sol[:, -1].float()
    return sol.float(), None


def predict(x: torch.Tensor, keep: np.ndarray, kk: int, w: torch.Tensor, b) -> torch.Tensor:
    """X[:, kept] W^T + b: the refitted conv's outputs at the sampled points."""
    cols = torch.from_numpy((keep[:, None] * kk + np.arange(kk)[None]).reshape(-1))
    pred = x[:, cols] @ w.reshape(len(w), -1).T.cpu()
    return pred + b.cpu() if b is not None else pred


def l1_fit(filters: torch.Tensor, w_old: torch.Tensor, b_old: torch.Tensor | None, k: int):
    """The baseline: keep the ``k`` channels whose ``filters`` have the largest L1 norms; the next conv
    keeps its weights on them (``w_old`` cut to (out, k * kh * kw)), no refit. (keep, weights, bias)."""
    keep = l1_select(filters, k)
    return keep, w_old[:, torch.from_numpy(keep)].reshape(len(w_old), -1), b_old


def lasso_fit(sm: Samples, w_old: torch.Tensor, b_old: torch.Tensor | None, k: int, scale, shortcut: bool):
    """LASSO + least squares on ``sm``: (keep, weights, bias). With ``scale`` (the per-channel factor of a
    branch2c's BatchNorm/Scale into its residual sum) and ``shortcut``, the residual sum is what is matched."""
    kk = w_old[0, 0].numel()
    target, w_sel, y_fit = sm.y - b_old if b_old is not None else sm.y, w_old, sm.y
    if scale is not None and shortcut:
        # He et al. 2017 sec. 3.3: branch2c reconstructs original branch + (original - pruned) shortcut.
        # LASSO in the sum's space (rows weighted by the BN/Scale factor); the per-channel least squares
        # solves for the conv output, so the drift goes back through the affine: y + drift / scale.
        s = scale.float()
        target, w_sel = target * s + sm.drift, w_old * s.view(-1, 1, 1, 1)
        ok = s.abs() > s.abs().max() * 1e-6  # a channel scaled to ~0 cannot carry the shortcut's drift
        y_fit = sm.y + torch.where(ok, sm.drift / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(s))
    keep = lasso_select(sm.x, target, w_sel, k)
    w_new, b_new = reconstruct(sm.x, y_fit, keep, kk, b_old is not None)
    return keep, w_new, b_new


def held_out_error(sm: Samples, keep: np.ndarray, kk: int, w: torch.Tensor, b, scale) -> float:
    """Relative error of the refitted conv on ``sm``; with ``scale``, of the Eltwise output it feeds."""
    pred = predict(sm.x, keep, kk, w, b)
    if scale is None:
        diff, ref = pred - sm.y, sm.y
    else:  # error of the Eltwise output: scale * (conv - original conv) - shortcut drift
        diff, ref = (pred - sm.y) * scale.float() - sm.drift, sm.ref
    return float(diff.norm() / ref.norm().clamp(min=1e-30))


HOLD_OUT = 0.2  # share of the sampled points kept out of the fit to measure the relative error


def split_held_out(sm: Samples, seed: int) -> tuple[Samples, Samples]:
    """(held-out, fitting) split of the sampled points (both all of them when too few to split)."""
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(sm.x)))
    n_held = int(len(order) * HOLD_OUT)
    return (sm.split(order[:n_held]), sm.split(order[n_held:])) if n_held else (sm, sm)
