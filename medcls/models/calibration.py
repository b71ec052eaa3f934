"""Honest probabilities: temperature scaling, expected calibration error, and the input gate.

- :func:`fit_temperature` finds the temperature T minimising the negative log-likelihood of
  ``softmax(logits / T)`` on the validation split (Guo et al., ICML 2017);
  :func:`fit_calibration` may add one bias per class (``softmax(logits / T + b)``, bias-corrected
  temperature scaling, Alexandari et al., ICML 2020): it corrects the class prior that balanced
  sampling shifts, and is kept only when it lowers the validation NLL under cross-validation.
- :func:`expected_calibration_error`: top-label ECE with equal-width bins.
- :class:`InputGate`: is this scan like what the model was trained on? The Mahalanobis
  distance of the model's penultimate embedding to the nearest class mean, with a shared
  Ledoit-Wolf covariance (Lee et al., NeurIPS 2018), thresholded at a quantile of the
  validation split's distances.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax


def probabilities(logits: np.ndarray, temperature: float = 1.0, bias=None) -> np.ndarray:
    """Calibrated probabilities: ``softmax(logits / T + bias)`` (no bias: plain temperature)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64)
    return softmax(z, axis=-1)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood. ``y`` is class indices (N,), or (N, K) label sets (1 for
    each allowed class: a partial label's likelihood is its classes' summed probability)."""
    lp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=-1)
    y = np.asarray(y)
    if y.ndim == 2:
        return float(-np.log(np.maximum((np.exp(lp) * y).sum(1), 1e-300)).mean())
    return float(-lp[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature (0.05 to 20) that minimises validation NLL (``y``: indices or label sets)."""
    res = minimize_scalar(lambda log_t: nll(logits, y, float(np.exp(log_t))),
                          bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def _fit_bias_and_temperature(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    from scipy.optimize import minimize

    k = np.asarray(logits).shape[1]

    def loss(p):
        return nll(np.asarray(logits, np.float64) / np.exp(p[0]) + p[1:], y)
    res = minimize(loss, np.zeros(1 + k), method="L-BFGS-B",
                   bounds=[(np.log(0.05), np.log(20.0))] + [(-5.0, 5.0)] * k)
    bias = res.x[1:] - res.x[1:].mean()  # softmax is unchanged by a common shift
    return float(np.exp(res.x[0])), bias


def fit_calibration(logits: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> dict:
    """Temperature alone, or temperature and a bias per class, whichever has the lower
    validation NLL under ``folds``-fold cross-validation (each fold's rows scored by parameters
    fitted on the others); the chosen form is then fitted on all rows. ``y``: class indices or
    label sets. Returns ``{"temperature", "class_bias" (None for temperature alone), "method",
    "cv_nll"}``."""
    logits = np.asarray(logits, np.float64)
    y = np.asarray(y)
    order = np.random.default_rng(seed).permutation(len(logits))
    parts = np.array_split(order, folds)
    cv = {"temperature": 0.0, "temperature+bias": 0.0}
    for k in range(folds):
        test = parts[k]
        train = np.concatenate([parts[j] for j in range(folds) if j != k])
        t = fit_temperature(logits[train], y[train])
        cv["temperature"] += nll(logits[test], y[test], t) * len(test)
        t, b = _fit_bias_and_temperature(logits[train], y[train])
        cv["temperature+bias"] += nll(logits[test] / t + b, y[test]) * len(test)
    cv = {m: v / len(logits) for m, v in cv.items()}
    if cv["temperature+bias"] < cv["temperature"]:
        t, b = _fit_bias_and_temperature(logits, y)
        return {"temperature": t, "class_bias": [float(v) for v in b], "method": "temperature+bias",
                "cv_nll": cv}
    return {"temperature": fit_temperature(logits, y), "class_bias": None, "method": "temperature",
            "cv_nll": cv}


def expected_calibration_error(probs: np.ndarray, y: np.ndarray | None, n_bins: int = 15,
                               correct: np.ndarray | None = None) -> float:
    """Top-label ECE: the bin-weighted gap between confidence and accuracy. ``correct`` (one
    bool per row) replaces ``y`` where being right is not "argmax equals the label" (a partial
    label is right when its set holds the prediction)."""
    probs = np.asarray(probs)
    conf = probs.max(axis=1)
    if correct is None:
        correct = probs.argmax(axis=1) == np.asarray(y)
    correct = np.asarray(correct, np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


@dataclass
class InputGate:
    """Flags scans whose embedding is far from every training class."""

    means: np.ndarray  # (K, D) class means of training embeddings
    precision: np.ndarray  # (D, D) inverse shared covariance
    threshold: float  # distances above it are "outside what this model was trained on"
    quantile: float = 0.99

    @classmethod
    def fit(cls, emb_train: np.ndarray, y_train: np.ndarray, emb_val: np.ndarray,
            quantile: float = 0.99) -> "InputGate":
        from sklearn.covariance import LedoitWolf

        emb_train = np.asarray(emb_train, dtype=np.float64)
        classes = np.unique(y_train)
        means = np.stack([emb_train[y_train == k].mean(axis=0) for k in classes])
        centred = emb_train - means[np.searchsorted(classes, y_train)]
        precision = LedoitWolf().fit(centred).precision_
        gate = cls(means=means, precision=precision, threshold=np.inf, quantile=quantile)
        gate.threshold = float(np.quantile(gate.score(emb_val), quantile))
        return gate

    def score(self, emb: np.ndarray) -> np.ndarray:
        """Distance to the nearest class mean (larger is more unusual)."""
        emb = np.atleast_2d(np.asarray(emb, dtype=np.float64))
        d = emb[:, None, :] - self.means[None, :, :]
        m = np.einsum("nkd,de,nke->nk", d, self.precision, d)
        return np.sqrt(np.maximum(m.min(axis=1), 0.0))

    def is_outside(self, emb: np.ndarray) -> np.ndarray:
        return self.score(emb) > self.threshold

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, means=self.means.astype(np.float32),
                            precision=self.precision.astype(np.float32),
                            threshold=np.float64(self.threshold), quantile=np.float64(self.quantile))

    @classmethod
    def load(cls, path: str | Path) -> "InputGate":
        with np.load(path) as z:
            return cls(means=z["means"].astype(np.float64), precision=z["precision"].astype(np.float64),
                       threshold=float(z["threshold"]), quantile=float(z["quantile"]))
