"""Mixing law: held-out loss as a function of the domain share alpha, fitted from proxy runs (no torch).

Form (Data Mixing Laws, Ye et al. 2024, eq. 1 for two groups): the loss of one held-out set after training on
a mixture with domain share `alpha` and replay share `1 - alpha` is

    L(alpha) = c + k * exp(t * alpha)

(their `c + k exp(t_d r_d + t_g r_g)` with r_g = 1 - alpha folds into one exponent t = t_d - t_g). Why this
form: it is the one law shown to predict held-out losses of unseen mixtures from a few small runs, it is
monotone in alpha (more domain data never helps the replay set, and vice versa) with a floor c, and its three
parameters are fitted from as few as three alphas. D-CPT Law (Que et al. 2024) uses a power law in the ratio
with model size and tokens; we take its token dimension only (below), since a search holds the model fixed.

Fit: for a fixed t the law is linear in (c, k), so t is profiled (a grid, then a bounded 1-D refinement) and
(c, k) solved by least squares. Uncertainty: the parameter covariance s^2 (J^T J)^-1 with s^2 = RSS / (n - 3);
with exactly three alphas the law interpolates and has no residual degrees of freedom, so no covariance
(`cov is None`): give four or more alphas for an error band. Prediction standard errors use the delta method.

Tokens (extrapolation to the full run): the change from the base model grows as a power of the training
tokens, dL(D) = dL(D2) * (D / D2)^b (D-CPT Law's token term), with b per group fitted from the losses at two
proxy lengths D1 < D2 (the proxy's evaluation half way and at its end), clipped to [0, 1].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from cpt_megatron.errors import CptError

__all__ = ["ExpLaw", "fit_exp_law", "token_exponent", "MIN_POINTS", "relative_change", "recommend"]

MIN_POINTS = 3
"""Distinct alphas the law needs (three parameters); one more gives an uncertainty."""
_T_MAX = 30.0
"""|t| bound: exp(30) spans any loss change that can happen between alpha 0 and 1."""


@dataclasses.dataclass(kw_only=True)
class ExpLaw:
    """L(alpha) = c + k * exp(t * alpha), fitted on `n_points` alphas."""

    c: float
    k: float
    t: float
    n_points: int
    rss: float
    """Residual sum of squares of the fit (nats^2)."""
    cov: list[list[float]] | None = None
    """Covariance of (c, k, t); None with no residual degrees of freedom (n_points == 3)."""
    form: str = "c + k*exp(t*alpha)"

    @property
    def identified(self) -> bool:
        """False when t sits at its bound: the points are not monotone in alpha or jump like a step (the law then
        fits a step function and its predictions between the points are not to be trusted)."""
        return abs(self.t) < _T_MAX * (1 - 1e-6)

    def __call__(self, alpha):
        return self.c + self.k * np.exp(self.t * np.asarray(alpha, dtype=float))

    def std(self, alpha) -> np.ndarray | None:
        """Standard error of the prediction at `alpha` (delta method); None without a covariance."""
        if self.cov is None:
            return None
        a = np.atleast_1d(np.asarray(alpha, dtype=float))
        e = np.exp(self.t * a)
        jac = np.stack([np.ones_like(a), e, self.k * a * e], axis=1)
        var = np.einsum("ni,ij,nj->n", jac, np.asarray(self.cov), jac)
        return np.sqrt(np.maximum(var, 0.0)).reshape(np.shape(alpha))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _solve_ck(x: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float, float]:
    a = np.stack([np.ones_like(x), np.exp(t * x)], axis=1)
    (c, k), *_ = np.linalg.lstsq(a, y, rcond=None)
    r = y - a @ np.array([c, k])
    return float(c), float(k), float(r @ r)


def fit_exp_law(alphas: Sequence[float], losses: Sequence[float], *, what: str = "held-out set") -> ExpLaw:
    """Least-squares fit of c + k*exp(t*alpha) to (alpha, loss) points (several losses per alpha allowed)."""
    x, y = np.asarray(alphas, dtype=float), np.asarray(losses, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise CptError(f"{what}: {x.shape} alphas vs {y.shape} losses; give one loss per alpha")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise CptError(f"{what}: non-finite loss {y.tolist()} at alphas {x.tolist()}: a proxy diverged; "
                       "lower optim.lr or check its train.log")
    n_distinct = len(np.unique(np.round(x, 9)))
    if n_distinct < MIN_POINTS:
        raise CptError(f"{what}: {n_distinct} distinct alpha(s) {sorted(set(x.tolist()))}: the law c + k*exp(t*alpha) "
                       f"needs at least {MIN_POINTS} (give --alphas with 3+, 5 for an error band)")
    # Profile t: coarse grid (the RSS in t is smooth but may be flat near t = 0), then a bounded refinement.
    grid = np.concatenate([-np.geomspace(_T_MAX, 1e-3, 60), np.geomspace(1e-3, _T_MAX, 60)])
    rss = np.array([_solve_ck(x, y, t)[2] for t in grid])
    i = int(np.argmin(rss))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    from scipy.optimize import minimize_scalar

    opt = minimize_scalar(lambda t: _solve_ck(x, y, t)[2], bounds=(min(lo, hi), max(lo, hi)), method="bounded",
                          options={"xatol": 1e-10})
    t = float(opt.x) if opt.fun <= rss[i] else float(grid[i])
    c, k, r = _solve_ck(x, y, t)
    cov = None
    dof = len(x) - 3
    if dof > 0:
        e = np.exp(t * x)
        jac = np.stack([np.ones_like(x), e, k * x * e], axis=1)
        s2 = r / dof
        try:
            cov = (s2 * np.linalg.inv(jac.T @ jac)).tolist()
        except np.linalg.LinAlgError:
            cov = None
    return ExpLaw(c=c, k=k, t=t, n_points=len(x), rss=r, cov=cov)


def token_exponent(pairs: Sequence[tuple[float, float]], tokens_ratio: float, *, floor: float = 1e-4) -> float | None:
    """b in dL(D) ~ D^b from (dL at D1, dL at D2) pairs with D2 / D1 = tokens_ratio, pooled by least squares over
    the pairs whose changes share a sign and exceed `floor` nats; clipped to [0, 1]. None when no pair is usable."""
    if tokens_ratio <= 1:
        return None
    logs = [math.log(d2 / d1) for d1, d2 in pairs
            if abs(d1) > floor and abs(d2) > floor and (d1 > 0) == (d2 > 0)]
    if not logs:
        return None
    b = float(np.mean(logs)) / math.log(tokens_ratio)
    return min(max(b, 0.0), 1.0)


def relative_change(metric: str, loss, base_loss: float):
    """Relative change (positive = worse) of a lower-is-better metric when the loss goes base_loss -> loss on the
    same held-out tokens: ppl = exp(loss), so (ppl - ppl0) / ppl0 = exp(dL) - 1; loss, bits_per_byte and
    bits_per_char are proportional to the loss, so dL / L0 (the monitor's `relative_regression` on each)."""
    loss = np.asarray(loss, dtype=float)
    if metric == "ppl":
        return np.expm1(loss - base_loss)
    if metric in ("loss", "bits_per_byte", "bits_per_char"):
        return (loss - base_loss) / base_loss
    raise CptError(f"metric {metric!r}: the mixing law predicts loss-based metrics only (ppl, loss, bits_per_byte, "
                   "bits_per_char)")


def recommend(alphas: np.ndarray, regression: np.ndarray, budget: float) -> float | None:
    """The largest alpha of the (ascending) grid whose predicted regression stays within `budget`; None if none."""
    ok = np.flatnonzero(np.asarray(regression) <= budget + 1e-12)
    return float(alphas[ok[-1]]) if len(ok) else None
