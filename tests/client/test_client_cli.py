"""The client half of the `afif` command, run in-process against the real stack."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from client_fixtures import LogReg, Registered

from client import JobCancelled
from client.cli import (
    EXIT_API,
    EXIT_JOB_CANCELLED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    main,
    parse_params,
)
from client.stack import LocalStack


def _run(stack: LocalStack, capsys: pytest.CaptureFixture[str], *argv: str
         ) -> tuple[int, str, str]:
    code = main([*argv, "--url", stack.url, "--key", stack.key])
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_params_reads_json_values() -> None:
    got = parse_params('{"folds": 3, "seed": 1}', ["seed=2", "remove=[1,2]", "method=fisher",
                                                   "unlearn=true"])
    assert got == {"folds": 3, "seed": 2, "remove": [1, 2], "method": "fisher",
                   "unlearn": True}
    with pytest.raises(ValueError):
        parse_params(None, ["novalue"])


def test_lists_as_json(stack: LocalStack, registered: Registered,
                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(stack, capsys, "models", "list", "--output", "json")
    assert code == EXIT_OK
    assert registered.model.id in {m["id"] for m in json.loads(out)}
    code, out, _ = _run(stack, capsys, "datasets", "show", registered.train.id)
    assert code == EXIT_OK and registered.train.id in out and "n_rows" in out


def test_submit_wait_result(stack: LocalStack, registered: Registered,
                            capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = _run(stack, capsys, "submit", "cv", "--model", registered.model.id,
                        "--dataset", registered.train.id, "--param", "folds=2",
                        "--output", "json")
    assert code == EXIT_OK
    job = json.loads(out)
    assert job["kind"] == "cv" and job["params"]["folds"] == 2

    code, out, err = _run(stack, capsys, "jobs", "wait", job["id"])
    assert code == EXIT_OK and "succeeded" in out
    code, out, _ = _run(stack, capsys, "jobs", "result", job["id"], "--output", "json",
                        "--save", str(tmp_path / "res"))
    result = json.loads(out)
    assert code == EXIT_OK and len(result["per_fold"]) == 2
    assert np.isfinite(result["estimate"])

    # Folds of 80 rows exceed the stack's AFIF_INLINE_MAX: --save downloads them as .npy.
    saved = [np.load(tmp_path / "res" / f"per_fold.{j}.indices.npy") for j in range(2)]
    assert sorted(np.concatenate(saved).tolist()) == list(range(len(saved[0]) * 2))
    assert json.loads((tmp_path / "res" / "result.json").read_text()) == result

    code, out, _ = _run(stack, capsys, "models", "download", registered.model.id, "-o",
                        str(tmp_path / "w.safetensors"))
    assert code == EXIT_OK
    assert (tmp_path / "w.safetensors").stat().st_size == registered.model.size_bytes


def test_failed_job_exits_non_zero_with_the_server_message(
    stack: LocalStack, registered: Registered, capsys: pytest.CaptureFixture[str],
    failing_params: dict[str, object],
) -> None:
    code, out, err = _run(stack, capsys, "submit", "unlearning", "--model", registered.model.id,
                          "--dataset", registered.train.id, "--params",
                          json.dumps(failing_params), "--wait", "--no-progress")
    assert code == EXIT_JOB_FAILED
    assert "failed" in err and "no_such_option" in err

    code, out, _ = _run(stack, capsys, "jobs", "list", "--status", "failed", "--output", "json")
    failed = json.loads(out)
    assert code == EXIT_OK and failed and all(j["status"] == "failed" for j in failed)
    code, _, err = _run(stack, capsys, "jobs", "wait", failed[0]["id"])
    assert code == EXIT_JOB_FAILED and failed[0]["error"]["message"] in err


def test_refused_request_exits_with_the_problem(stack: LocalStack, registered: Registered,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(stack, capsys, "submit", "unlearning", "--model", registered.model.id,
                        "--dataset", registered.train.id, "--param", "remove=[99999]")
    assert code == EXIT_API
    assert "422" in err and "params.remove" in err


def test_cancelled_job_exits_non_zero(tmp_path: Path, logreg: LogReg,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    # No workers: the job stays queued, so the cancel always wins the race.
    with LocalStack(tmp_path / "idle", tenant="idle", workers=0) as idle:
        with idle.client() as c:
            model = c.register_model(logreg.module, family="bernoulli",
                                     regularizer={"kind": "l2", "strength": logreg.lam})
            data = c.register_dataset(logreg.X, logreg.y)
            job = c.submit("cv", model=model, dataset=data, folds=2)
            assert job.status == "queued"

            code, out, _ = _run(idle, capsys, "jobs", "cancel", job.id)
            assert code == EXIT_OK and "cancelled" in out
            with pytest.raises(JobCancelled):
                job.refresh().wait(timeout=10)
        code, out, err = _run(idle, capsys, "jobs", "wait", job.id, "--no-progress")
        assert code == EXIT_JOB_CANCELLED and "cancelled" in err
