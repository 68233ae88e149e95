"""The examples, run with --quick against one real stack; their outputs checked for content."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from client.stack import LocalStack

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("afif-examples"), tenant="examples") as running:
        yield running


def run_example(stack: LocalStack, name: str, out: Path, *extra: str
                ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / f"{name}.py"), "--quick", "--url", stack.url,
         "--key", stack.key, "--out", str(out), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    return done


def ok(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def summary(out: Path, name: str) -> dict[str, Any]:
    assert (out / f"{name}.md").read_text().count("|") > 10
    data: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    return data


def test_pipeline_step_passes_and_fails_on_the_threshold(stack: LocalStack, tmp_path: Path
                                                         ) -> None:
    done = run_example(stack, "pipeline_step", tmp_path / "pass", "--threshold", "1.0")
    ok(done)
    s = summary(tmp_path / "pass", "pipeline_step")
    assert s["passed"] and 0 <= s["after"] <= s["before"] <= 1
    assert "PASS" in done.stdout
    assert png_size(tmp_path / "pass" / "pipeline_step.png") == (500, 400)

    done = run_example(stack, "pipeline_step", tmp_path / "fail", "--threshold", "0")
    assert done.returncode == 1, done.stderr
    assert "FAIL" in done.stdout
    assert not summary(tmp_path / "fail", "pipeline_step")["passed"]


def test_fairness_example(stack: LocalStack, tmp_path: Path) -> None:
    ok(run_example(stack, "fairness", tmp_path))
    s = summary(tmp_path, "fairness")
    assert s["metric"] == "chi2" and s["dataset"] == "diabetes"
    rows = {r["model"]: r for r in s["rows"]}
    assert set(rows) == {"ERM", "fisher-unlearned", "hessian-unlearned"}
    erm, fisher = rows["ERM"], rows["fisher-unlearned"]
    for name in ("fisher-unlearned", "hessian-unlearned"):
        row = rows[name]
        assert row["status"] == "succeeded", row
        # Each unlearned model is at least as fair on the training rows as ERM.
        assert 0 <= row["train_metric"] <= erm["train_metric"]
        assert 0 < row["utility"] < 1 and 0 <= row["removed"] <= 0.2 * s["n_train"]
    # Standardized target: a test MSE of a useful model sits well below 1.
    assert 0 < erm["utility"] < 1 and 0 < fisher["utility"] < 1
    assert fisher["removed"] <= 0.2 * s["n_train"]
    assert png_size(tmp_path / "fairness.png") == (1000, 400)


def test_attribution_example(stack: LocalStack, tmp_path: Path) -> None:
    ok(run_example(stack, "attribution", tmp_path))
    s = summary(tmp_path, "attribution")
    assert len(s["rows"]) == s["n_test_shown"] == 3
    assert s["test_accuracy"] > 0.8
    for r in s["rows"]:
        assert math.isfinite(r["spearman"]) and math.isfinite(r["max_gap_rel"])
        assert r["loss"] > 0
    # The quick CNN is small and rough, so whole rankings may disagree, but the largest
    # |scores| of the two curvatures should overlap well beyond chance (set size / n).
    chance = 9 / s["n_train"]  # 9 = 3 * SHOW, the set size in examples/attribution.py
    overlaps = [r["top_overlap"] for r in s["rows"]]
    assert sum(overlaps) / len(overlaps) > 2 * chance
    losses = [r["loss"] for r in s["rows"]]
    assert losses == sorted(losses, reverse=True)  # highest-loss test images first
    # 1 test column + 4 x 3 training columns of 80-pixel cells, 3 rows.
    assert png_size(tmp_path / "attribution.png") == (13 * 80, 3 * 80)
    assert png_size(tmp_path / "attribution_agreement.png") == (480, 320)


def test_cv_example(stack: LocalStack, tmp_path: Path) -> None:
    ok(run_example(stack, "cv", tmp_path))
    s = summary(tmp_path, "cv")
    assert [r["epochs"] for r in s["rows"]] == [1, 4, 16]
    for r in s["rows"]:
        assert 0 < r["test_loss"] < 1  # log-loss of a classifier better than chance
        assert 0 < r["exact"] < 1
        assert math.isfinite(r["fisher"]) and r["fisher"] > 0
    # Training lowers the exact CV loss from the first to the last checkpoint.
    assert s["rows"][-1]["exact"] < s["rows"][0]["exact"]
    assert png_size(tmp_path / "cv.png") == (800, 500)
