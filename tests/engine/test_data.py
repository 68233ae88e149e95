"""Dataset loaders: the Adult parser on a tiny synthetic copy, the scikit-learn splits."""

from __future__ import annotations

import numpy as np
import pytest

from engine.data import load_adult, load_sklearn

_TRAIN_ROWS = [
    "39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White,"
    " Male, 2174, 0, 40, United-States, <=50K",
    "50, Private, 83311, Masters, 14, Married-civ-spouse, Exec-managerial, Husband, White,"
    " Male, 0, 0, 13, United-States, >50K",
    "38, Private, 215646, HS-grad, 9, Divorced, ?, Not-in-family, White, Female, 0, 0, 40,"
    " United-States, <=50K",
    "28, Private, 338409, Bachelors, 13, Married-civ-spouse, Prof-specialty, Wife, Black,"
    " Female, 0, 0, 40, Cuba, <=50K",
    "",
]
_TEST_ROWS = [
    "|1x3 Cross validator",
    "25, Private, 226802, Masters, 7, Never-married, Adm-clerical, Own-child, Black, Female,"
    " 0, 0, 40, Peru, >50K.",
    "38, Local-gov, 89814, HS-grad, 9, Married-civ-spouse, Prof-specialty, Husband, White,"
    " Male, 0, 0, 50, United-States, <=50K.",
]
TRAIN = "\n".join(_TRAIN_ROWS) + "\n"
TEST = "\n".join(_TEST_ROWS) + "\n"


def test_adult_parser_drops_missing_rows_one_hot_encodes_and_returns_sex(tmp_path):
    (tmp_path / "adult.data").write_text(TRAIN)
    (tmp_path / "adult.test").write_text(TEST)

    data = load_adult(tmp_path)

    # The row with '?' is dropped; sex leaves the features and becomes s (Female = 1).
    assert data.X_train.shape[0] == 3 and data.X_test.shape[0] == 2
    assert data.y_train.tolist() == [0.0, 1.0, 0.0]
    assert data.y_test.tolist() == [1.0, 0.0]
    assert data.s_train.tolist() == [0.0, 0.0, 1.0]
    assert data.s_test.tolist() == [1.0, 0.0]
    assert not any(name.startswith("sex") for name in data.feature_names)
    assert len(data.feature_names) == data.X_train.shape[1]
    numeric = data.X_train[:, :6]
    assert np.allclose(numeric.mean(axis=0), 0.0)
    # Unseen test categories (Peru, Local-gov) encode as all zeros in their block.
    country = [i for i, n in enumerate(data.feature_names) if n.startswith("native-country=")]
    assert data.X_test[0, country].sum() == 0.0
    assert data.X_test[1, country].sum() == 1.0


def test_adult_parser_names_a_missing_file(tmp_path):
    (tmp_path / "adult.data").write_text(TRAIN)
    with pytest.raises(FileNotFoundError, match="adult.test"):
        load_adult(tmp_path)


@pytest.mark.parametrize("name", ["breast_cancer", "diabetes", "iris"])
def test_sklearn_splits_are_standardized_on_train(name):
    data = load_sklearn(name, test_fraction=0.25, seed=1)

    assert np.allclose(data.X_train.mean(axis=0), 0.0, atol=1e-10)
    assert data.X_train.shape[0] + data.X_test.shape[0] > 100
    if name == "diabetes":
        assert set(np.unique(data.s_train)) == {0.0, 1.0}
        assert "sex" not in data.feature_names
    else:
        assert data.s_train is None


def test_sklearn_loader_rejects_unknown_names_and_fractions():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_sklearn("mnist")
    with pytest.raises(ValueError, match="test_fraction"):
        load_sklearn("iris", test_fraction=1.5)
