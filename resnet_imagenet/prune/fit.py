"""Channel pruning's numerics: sampling feature points, LASSO channel selection, least-squares refit.

(He, Zhang & Sun, "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017, eq. 1-3.)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from resnet_imagenet.net import layers as L
from resnet_imagenet.net.net import CaffeNet

# --- sampling -----------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a forward hook once the wanted layer has run: the rest of the net is skipped."""


def _capture(
    net: CaffeNet, layer: str, x: torch.Tensor, stop_at: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """(input, output) of ``layer`` for the batch ``x``, running the net only up to that layer, and, with
    ``stop_at``, the inputs of that later layer too (read before it runs: an Eltwise may sum in place)."""
    got: dict = {}

    def hook(_m, inp, out):
        got["x"], got["y"] = inp[0], out
        if stop_at is None:
            raise _Stop

    def pre_hook(_m, inp):
        got["later"] = tuple(inp)
        raise _Stop

    hooks = [net.layers[layer].register_forward_hook(hook)]
    if stop_at is not None:
        hooks.append(net.layers[stop_at].register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            net(x)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    if "x" not in got or (stop_at is not None and "later" not in got):
        raise RuntimeError(f"layer '{layer}' did not run")
    return got["x"], got["y"], got.get("later", ())


def _patches(x: torch.Tensor, conv: L.Convolution, n: torch.Tensor, oh: torch.Tensor, ow: torch.Tensor):
    """Input patches (points, Cin * kh * kw) that produce conv outputs at (n, oh, ow), in weight order."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel, conv.stride, conv.pad, conv.dilation
    xp = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # N, H, W, C
    rows = oh[:, None] * sh + torch.arange(kh, device=x.device)[None] * dh  # P, kh
    cols = ow[:, None] * sw + torch.arange(kw, device=x.device)[None] * dw  # P, kw
    p = xp[n[:, None, None], rows[:, :, None], cols[:, None, :]]  # P, kh, kw, C
    return p.permute(0, 3, 1, 2).reshape(len(n), -1)


@dataclass
class Samples:
    """x: the conv's input patches in the pruned net; y: its outputs in the original net (same points).

    For a conv whose output (through per-channel layers) is a bottom of an Eltwise SUM, also at the same
    points: ``drift`` = sum over the other bottoms of coeff * (original - pruned), what the pruned net's
    shortcut lost, and ``ref`` = the original Eltwise output; else both None.
    """

    x: torch.Tensor
    y: torch.Tensor
    drift: torch.Tensor | None = None
    ref: torch.Tensor | None = None

    def split(self, idx: torch.Tensor) -> Samples:
        drift, ref = (None, None) if self.drift is None else (self.drift[idx], self.ref[idx])
        return Samples(self.x[idx], self.y[idx], drift, ref)


def sample_points(
    orig: CaffeNet,
    pruned: CaffeNet,
    layer: str,
    batches: Iterable[torch.Tensor],
    points: int,
    seed: int,
    sum_layer: str | None = None,
    main: int = 0,
) -> Samples:
    """Sample ``points`` random output positions per image of conv ``layer`` (see Samples).

    ``sum_layer``: the Eltwise SUM that ``layer``'s output reaches as its bottom number ``main``.
    Only the points are kept, so memory is points x patch size.
    """
    rng = np.random.default_rng(seed)
    conv = pruned.layers[layer]
    coeff = pruned.layers[sum_layer].coeff if sum_layer is not None else []
    xs, ys, drifts, refs = [], [], [], []
    for x in batches:
        _, y, later_o = _capture(orig, layer, x, sum_layer)
        xin, _, later_p = _capture(pruned, layer, x, sum_layer)
        nb, _, h, w = y.shape
        k = min(points, h * w)
        pos = np.concatenate([rng.choice(h * w, k, replace=False) for _ in range(nb)])
        n = torch.arange(nb).repeat_interleave(k).to(x.device)
        pos_t = torch.from_numpy(pos).to(x.device)
        oh, ow = pos_t // w, pos_t % w
        xs.append(_patches(xin, conv, n, oh, ow).cpu())
        ys.append(y[n, :, oh, ow].cpu())
        if sum_layer is not None:
            at = [(c, o[n, :, oh, ow].cpu(), p[n, :, oh, ow].cpu()) for c, o, p in zip(coeff, later_o, later_p)]
            drifts.append(sum(c * (o - p) for i, (c, o, p) in enumerate(at) if i != main))
            refs.append(sum(c * o for c, o, _ in at))
    if not xs:
        raise ValueError("no images to sample features from")
    if sum_layer is None:
        return Samples(torch.cat(xs), torch.cat(ys))
    return Samples(torch.cat(xs), torch.cat(ys), torch.cat(drifts), torch.cat(refs))


# --- selection and reconstruction ---------------------------------------------------------------


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


def relative_error(x: torch.Tensor, y: torch.Tensor, keep: np.ndarray, kk: int, w: torch.Tensor, b) -> float:
    """||X[:, kept] W^T + b - Y|| / ||Y|| over the given points."""
    return float((predict(x, keep, kk, w, b) - y).norm() / y.norm().clamp(min=1e-30))
