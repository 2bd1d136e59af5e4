"""AutoDistiller-style recommender: predict a distillation configuration's outcome from past search logs.

Paper: He et al., "Distiller: A Systematic Study of Model Distillation Methods in Natural Language Processing"
(SustaiNLP 2021). Their AutoDistiller regresses the KD outcome on (dataset meta-features, pipeline config) from
hyper-parameter-search logs and ranks configurations for a new task by the prediction. Here the logs are
`potstill search`'s search.json files of one teacher and task, so the features are the configuration's alone:
one-hot init, layer choice and objective set; depth (for layer-drop: the number of layers), width, heads, FFN,
temperature, log10 lr and objective weights as numbers (a value a trial did not have is filled with the column's
mean). The predictor is ridge regression on standardised features with an intercept, closed form:
w = (XᵀX + λI)⁻¹ Xᵀ (y − ȳ), default λ = 1.0. It is honest about its data: `loo_errors` refits without each
trial in turn and reports the prediction error on it (leave-one-out); with few trials that error, not the fit's,
says how far to trust a ranking.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from potstill.errors import UserError

CATEGORICAL = ("init", "layers", "objectives")


def _numeric(values: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        if key in CATEGORICAL:
            continue
        if key == "lr":
            out["log10_lr"] = math.log10(float(value))
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    if "layers" in values and "depth" not in out:
        out["depth"] = float(len(json.loads(values["layers"]) if isinstance(values["layers"], str)
                                 else values["layers"]))
    return out


@dataclass
class Encoder:
    """Configuration values (a trial's `values`) → feature rows, with the columns fixed by the training logs."""

    categories: dict[str, list[str]]
    numeric: list[str]
    fill: dict[str, float]

    @classmethod
    def fit(cls, configs: list[dict[str, Any]]) -> Encoder:
        categories = {k: sorted({str(c[k]) for c in configs if k in c}) for k in CATEGORICAL}
        rows = [_numeric(c) for c in configs]
        numeric = sorted({k for r in rows for k in r})
        fill = {k: float(np.mean([r[k] for r in rows if k in r])) for k in numeric}
        return cls({k: v for k, v in categories.items() if v}, numeric, fill)

    @property
    def columns(self) -> list[str]:
        return [f"{k}={v}" for k, vs in self.categories.items() for v in vs] + self.numeric

    def transform(self, configs: list[dict[str, Any]]) -> np.ndarray:
        out = []
        for c in configs:
            num = _numeric(c)
            row = [float(str(c.get(k)) == v) for k, vs in self.categories.items() for v in vs]
            row += [num.get(k, self.fill[k]) for k in self.numeric]
            out.append(row)
        return np.asarray(out, dtype=np.float64).reshape(len(configs), len(self.columns))


@dataclass
class Ridge:
    """Ridge regression on standardised columns (constant columns are dropped), with an intercept."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    intercept: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, lam: float = 1.0) -> Ridge:
        mean, std = x.mean(0), x.std(0)
        scale = np.where(std > 1e-12, std, np.inf)  # a constant column contributes nothing
        z = (x - mean) / scale
        gram = z.T @ z + lam * np.eye(z.shape[1])
        weights = np.linalg.lstsq(gram, z.T @ (y - y.mean()), rcond=None)[0]
        return cls(mean, scale, weights, float(y.mean()))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.weights + self.intercept


def loo_errors(x: np.ndarray, y: np.ndarray, lam: float = 1.0) -> np.ndarray:
    """Prediction minus truth for each row, from a ridge fitted on all the other rows."""
    n = len(y)
    if n < 3:
        raise UserError(f"the recommender needs at least 3 finished trials for a leave-one-out error, got {n}")
    keep = np.ones(n, dtype=bool)
    errors = np.empty(n)
    for i in range(n):
        keep[i] = False
        errors[i] = Ridge.fit(x[keep], y[keep], lam).predict(x[i:i + 1])[0] - y[i]
        keep[i] = True
    return errors


@dataclass
class Recommendation:
    config: dict[str, Any]
    predicted: float
    tried: bool


@dataclass
class Recommender:
    encoder: Encoder
    model: Ridge
    maximize: bool
    loo_mae: float
    baseline_mae: float  # leave-one-out error of predicting the mean of the other trials
    trials: int
    seen: list[dict[str, Any]]

    @classmethod
    def fit(cls, records: list[dict[str, Any]], *, maximize: bool = True, lam: float = 1.0) -> Recommender:
        """Fit on finished trials (`values`, `quality`) of search logs."""
        done = [r for r in records if r.get("state", "complete") == "complete" and math.isfinite(r["quality"])]
        configs, y = [r["values"] for r in done], np.asarray([r["quality"] for r in done], dtype=np.float64)
        encoder = Encoder.fit(configs)
        x = encoder.transform(configs)
        errors = loo_errors(x, y, lam)
        n = len(y)
        baseline = np.abs((y.sum() - y) / (n - 1) - y).mean()
        return cls(encoder, Ridge.fit(x, y, lam), maximize, float(np.abs(errors).mean()), float(baseline), n,
                   configs)

    def predict(self, configs: list[dict[str, Any]]) -> np.ndarray:
        return self.model.predict(self.encoder.transform(configs))

    def rank(self, configs: list[dict[str, Any]]) -> list[Recommendation]:
        """`configs` best predicted first."""
        predicted = self.predict(configs)
        seen = {json.dumps(c, sort_keys=True) for c in self.seen}
        out = [Recommendation(c, float(p), json.dumps(c, sort_keys=True) in seen)
               for c, p in zip(configs, predicted, strict=True)]
        return sorted(out, key=lambda r: -r.predicted if self.maximize else r.predicted)

    def combinations(self, limit: int = 5000) -> list[dict[str, Any]]:
        """New configurations: every combination of the values seen per init in the logs (at most `limit`)."""
        out: list[dict[str, Any]] = []
        for init in sorted({c["init"] for c in self.seen}):
            group = [c for c in self.seen if c["init"] == init]
            keys = sorted({k for c in group for k in c} - {"init"})
            options = [sorted({json.dumps(c[k]) for c in group if k in c}) for k in keys]
            for combo in itertools.product(*options):
                out.append({"init": init, **{k: json.loads(v) for k, v in zip(keys, combo, strict=True)}})
                if len(out) >= limit:
                    return out
        return out


def read_logs(paths: list[Path]) -> list[dict[str, Any]]:
    """The search.json files at `paths` (files, or folders searched for search.json up to three levels down)."""
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for depth in ("", "*/", "*/*/", "*/*/*/") for p in path.glob(f"{depth}search.json"))
    logs = []
    for file in dict.fromkeys(files):
        try:
            log = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{file}: not a readable search.json ({exc})") from None
        if not isinstance(log, dict) or "trials" not in log:
            raise UserError(f"{file}: not a potstill search log (no trials)")
        logs.append({**log, "file": str(file)})
    return logs
