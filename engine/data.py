"""Small tabular datasets for benchmarks and examples, as float numpy arrays.

The UCI Adult loader reads `adult.data` and `adult.test` from a folder the caller names
(nothing is downloaded). The scikit-learn loaders use the copies bundled with that
package, imported lazily so the engine does not depend on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

ADULT_COLUMNS = (
    "age", "workclass", "fnlwgt", "education", "education-num", "marital-status",
    "occupation", "relationship", "race", "sex", "capital-gain", "capital-loss",
    "hours-per-week", "native-country", "income",
)
ADULT_NUMERIC = ("age", "fnlwgt", "education-num", "capital-gain", "capital-loss",
                 "hours-per-week")
ADULT_SENSITIVE = "sex"


@dataclass(frozen=True)
class TabularSplit:
    """Train/test arrays. X: (n, d) float64 standardized with train statistics;
    y: (n,) labels (0/1 for classification, float for regression); s: (n,) sensitive
    attribute (for Adult: 1.0 = Female, 0.0 = Male), None when the dataset has none."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    s_train: np.ndarray | None
    s_test: np.ndarray | None
    feature_names: tuple[str, ...]


def _read_adult_rows(path: Path) -> list[list[str]]:
    """Rows of one Adult file with every field stripped; rows with a missing ('?')
    field, blank lines and the test file's header line are dropped."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            fields = [part.strip() for part in line.strip().split(",")]
            if len(fields) != len(ADULT_COLUMNS):
                continue
            if any(value == "?" for value in fields):
                continue
            rows.append(fields)
    return rows


def load_adult(folder: str | Path) -> TabularSplit:
    """UCI Adult from `folder` (adult.data, adult.test): income > 50K as y in {0, 1}.

    Rows with missing values are dropped; `sex` is removed from the features and
    returned as s; categorical columns are one-hot encoded with the categories seen in
    the training file (unseen test categories become all-zero); numeric columns are
    standardized with training mean and standard deviation. 30,162 train rows and
    102 features on the standard files.
    """
    folder = Path(folder)
    files = {name: folder / name for name in ("adult.data", "adult.test")}
    for name, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(f"Adult folder {folder} lacks {name}")

    train = _read_adult_rows(files["adult.data"])
    test = _read_adult_rows(files["adult.test"])
    if not train or not test:
        raise ValueError(f"no usable rows in the Adult files under {folder}")

    index = {name: i for i, name in enumerate(ADULT_COLUMNS)}
    categorical = [c for c in ADULT_COLUMNS
                   if c not in ADULT_NUMERIC and c not in (ADULT_SENSITIVE, "income")]
    categories = {c: sorted({row[index[c]] for row in train}) for c in categorical}

    def encode(rows: list[list[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        numeric = np.array([[float(row[index[c]]) for c in ADULT_NUMERIC] for row in rows])
        blocks = [numeric]
        for c in categorical:
            lookup = {value: j for j, value in enumerate(categories[c])}
            block = np.zeros((len(rows), len(lookup)))
            for i, row in enumerate(rows):
                j = lookup.get(row[index[c]])
                if j is not None:
                    block[i, j] = 1.0
            blocks.append(block)
        # The test file writes labels with a trailing period (">50K.").
        y = np.array([1.0 if row[index["income"]].rstrip(".") == ">50K" else 0.0
                      for row in rows])
        s = np.array([1.0 if row[index[ADULT_SENSITIVE]] == "Female" else 0.0
                      for row in rows])
        return np.hstack(blocks), y, s

    X_train, y_train, s_train = encode(train)
    X_test, y_test, s_test = encode(test)

    n_numeric = len(ADULT_NUMERIC)
    mean = X_train[:, :n_numeric].mean(axis=0)
    std = X_train[:, :n_numeric].std(axis=0)
    std[std == 0] = 1.0  # a constant column stays all zeros instead of NaN
    X_train[:, :n_numeric] = (X_train[:, :n_numeric] - mean) / std
    X_test[:, :n_numeric] = (X_test[:, :n_numeric] - mean) / std

    names = list(ADULT_NUMERIC)
    for c in categorical:
        names.extend(f"{c}={value}" for value in categories[c])
    logger.info("Adult: %d train rows, %d test rows, %d features",
                len(y_train), len(y_test), X_train.shape[1])
    return TabularSplit(X_train, y_train, X_test, y_test, s_train, s_test, tuple(names))


def load_sklearn(name: str, test_fraction: float = 0.25, seed: int = 0) -> TabularSplit:
    """A scikit-learn bundled dataset, shuffled, split and standardized (train stats).

    name: breast_cancer | digits | wine | iris | diabetes. For diabetes, y is the
    standardized target and s the `sex` column (two values, mapped to 0/1), which is
    then left out of X; other datasets have s = None.
    """
    from sklearn import datasets  # lazy: scikit-learn is a dev dependency only

    loaders = {
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
        "wine": datasets.load_wine,
        "iris": datasets.load_iris,
        "diabetes": datasets.load_diabetes,
    }
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(loaders)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")

    bunch = loaders[name]()
    X = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.float64)
    names = [str(f) for f in bunch.feature_names]
    s = None
    if name == "diabetes":
        col = names.index("sex")
        s = (X[:, col] > X[:, col].mean()).astype(np.float64)
        X = np.delete(X, col, axis=1)
        del names[col]

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = max(1, int(round(test_fraction * len(y))))
    test, train = order[:n_test], order[n_test:]

    mean, std = X[train].mean(axis=0), X[train].std(axis=0)
    std[std == 0] = 1.0
    X = (X - mean) / std
    if name == "diabetes":
        y = (y - y[train].mean()) / y[train].std()
    return TabularSplit(
        X[train], y[train], X[test], y[test],
        None if s is None else s[train], None if s is None else s[test], tuple(names),
    )
