"""RQ entry point `run_job(job_id)`: claim a job, run its engine task, store the outcome.

Everything a job needs is read from its SQL row and the content-addressed store, so a
job id is all the queue carries and any worker can take any job. Outcomes:

- engine result -> `complete_job` (result, artifacts and new model in one transaction);
- a cancel request seen at a progress or heartbeat check -> status `cancelled`;
- `SpecError` -> failed `invalid_input`; `SolverDiverged` -> failed `solver_diverged`
  with the residual; any other `EngineError` (non-finite parameters or objective) ->
  failed `numerical_error` with its message; anything else -> failed `internal_error`
  (logged with traceback);
- the worker process being stopped mid-job -> the job goes back to the queue (or fails
  after AFIF_MAX_ATTEMPTS), as the reconciler would do for a worker that died.
"""

from __future__ import annotations

import contextvars
import importlib.metadata
import io
import logging
import platform
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from engine.errors import EngineError, SolverDiverged, SpecError
from engine.problem import Problem
from engine.regularizers import make_regularizer
from service.db import session_scope
from service.domain import jobs as domain
from service.domain.models import regularizer_arguments
from service.models import Dataset, Job, Model
from service.schemas import PARAMS_BY_KIND
from service.settings import get_settings
from service.storage import get_store
from workers import runner
from workers.kinds import RUNNERS, Inputs, with_convergence
from workers.logcontext import job_context
from workers.runner import worker_name

logger = logging.getLogger(__name__)

# Progress rows are written at most this often (seconds); the engine may report faster.
PROGRESS_WRITE_INTERVAL_SECONDS = 1.0


class JobCancelled(Exception):
    """Raised inside the engine's progress callback to stop a job whose cancel was asked."""


class JobLost(Exception):
    """Raised inside the progress callback when this worker no longer owns the job (the
    reconciler took it for lost and requeued it); the row is left to its new owner."""


def run_job(job_id: str) -> None:
    """Run one afif job to a terminal status (or back to the queue if interrupted)."""
    with job_context(job_id):
        with session_scope() as session:
            job = domain.claim_job(session, job_id, worker_name())
        if job is None:
            logger.info("job is cancelled, finished or taken; skipping")
            return
        logger.info("running %s job (attempt %d)", job.kind, job.attempts)
        _execute(job)


def _execute(job: Job) -> None:
    settings = get_settings()
    beat = Beat(job.id, settings.heartbeat_seconds, owner=job.worker)
    beat.start()
    try:
        params = PARAMS_BY_KIND[job.kind].model_validate(job.params)
        started = time.perf_counter()
        inputs = load_inputs(job, params, beat)
        load_seconds = time.perf_counter() - started

        outcome = RUNNERS[job.kind](params, inputs, beat.progress)
        result = outcome.result
        new_model = None
        if result.parameters is not None and outcome.removed is not None:
            new_model = {
                "weights": save_safetensors(_contiguous(result.parameters)),
                "removed_indices": outcome.removed,
            }
        beat.check_cancelled()

        with session_scope() as session:
            domain.complete_job(
                session,
                job.id,
                values=with_convergence(result.values),
                arrays=result.arrays,
                timings={"load": load_seconds, **result.timings},
                device=result.device,
                versions=library_versions(),
                new_model=new_model,
            )
        logger.info("job succeeded in %.2f s", time.perf_counter() - started)
    except JobCancelled:
        logger.info("job cancelled at the caller's request")
        with session_scope() as session:
            domain.mark_cancelled(session, job.id)
    except JobLost:
        logger.warning("job was requeued while this worker ran it; leaving it to the retry")
    except SpecError as exc:
        logger.info("job failed: invalid input: %s", exc)
        _fail(job.id, "invalid_input", str(exc))
    except SolverDiverged as exc:
        residual = getattr(exc.report, "relative_residual", None)
        message = f"{exc} (relative residual {residual})"
        logger.warning("job failed: solver diverged: %s", message)
        _fail(job.id, "solver_diverged", message)
    except EngineError as exc:
        # The engine's deliberate refusals (non-finite parameters or objectives, ...) say
        # what to change (damping, regularization, solver); they are not our bugs.
        logger.warning("job failed: numerical error: %s", exc)
        _fail(job.id, "numerical_error", str(exc))
    except (KeyboardInterrupt, SystemExit):
        # The worker is being stopped: give the job back rather than leave it running.
        logger.warning("worker stopping mid-job; returning the job to the queue")
        _give_back(job.id, settings.max_attempts)
        raise
    except Exception as exc:
        logger.exception("job failed with an internal error")
        _fail(job.id, "internal_error", f"{type(exc).__name__}: {exc}")
    finally:
        beat.stop()


def _fail(job_id: str, code: str, message: str) -> None:
    with session_scope() as session:
        domain.fail_job(session, job_id, code, message)


def _give_back(job_id: str, max_attempts: int) -> None:
    from service import queue

    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != "running":
            return
        requeued = domain.requeue_or_fail(session, job, max_attempts)
    if requeued:
        try:
            queue.enqueue_job(job_id)
        except Exception:
            # The row stays flagged enqueue_failed; the reconciler enqueues it.
            logger.warning("could not re-enqueue; the reconciler will", exc_info=True)
            return
        with session_scope() as session:
            domain.mark_enqueued(session, job_id)


class Beat:
    """The heartbeat thread of one running job, and its throttled progress writer.

    Every `interval` seconds the thread refreshes the job's heartbeat, writes the latest
    progress not yet written, and notes a cancel request; `progress` (the engine's
    callback) writes at most once per PROGRESS_WRITE_INTERVAL_SECONDS and raises
    JobCancelled once a cancel was seen.
    """

    def __init__(
        self,
        job_id: str,
        interval: float,
        owner: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job_id = job_id
        self.interval = interval
        self.owner = owner
        self._clock = clock  # seconds; injectable so tests need no wall-clock timing
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending: tuple[str, int, int] | None = None
        self._last_write = -float("inf")
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._loop,), name=f"heartbeat-{job_id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, 2 * self.interval))

    def progress(self, phase: str, done: int, total: int) -> None:
        """Engine callback: record progress, write it if due, stop the job if cancelled."""
        # Limitation: a cancel takes effect at the engine's next progress call; a phase
        # that reports only its start and end runs to its end first.
        self.check_cancelled()
        with self._lock:
            self._pending = (phase, int(done), int(total))
            due = self._clock() - self._last_write >= PROGRESS_WRITE_INTERVAL_SECONDS
        if due:
            self._write_progress()
        self.check_cancelled()

    def check_cancelled(self) -> None:
        """Raise JobCancelled (a cancel was asked), JobLost (the job was requeued) or
        SystemExit (the worker is being stopped and its own SystemExit got lost)."""
        if runner.force_stop.is_set():
            raise SystemExit("worker cold shutdown")
        if self.lost.is_set():
            raise JobLost(self.job_id)
        if self.cancelled.is_set():
            raise JobCancelled(self.job_id)

    def _write_progress(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is None:
                return
            self._last_write = self._clock()
        with session_scope() as session:
            domain.set_progress(session, self.job_id, *pending)
            job = session.get(Job, self.job_id)
            self._note(job)

    def _note(self, job: Job | None) -> None:
        mine = job is not None and job.status == "running" and (
            self.owner is None or job.worker == self.owner
        )
        if not mine:
            self.lost.set()
        elif job is not None and job.cancel_requested:
            self.cancelled.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._write_progress()
                with session_scope() as session:
                    self._note(domain.heartbeat(session, self.job_id))
            except Exception:
                # A missed beat is survivable; the reconciler waits several intervals.
                logger.warning("heartbeat failed", exc_info=True)


def load_inputs(job: Job, params: Any, beat: Beat) -> Inputs:
    """The job's Problem (model + training set) and extra data, verified by sha256."""
    store = get_store()
    with session_scope() as session:
        model = session.get(Model, job.model_id)
        dataset = session.get(Dataset, job.dataset_id)
        test_dataset = None
        if job.kind == "attribution":
            test_dataset = session.get(Dataset, params.test_dataset_id)
            if test_dataset is None or test_dataset.tenant_id != job.tenant_id:
                raise SpecError(f"test_dataset_id: no dataset {params.test_dataset_id}")
    if model is None or dataset is None:
        raise SpecError("the job's model or dataset no longer exists")

    beat.progress("load", 0, 2)
    weights = load_safetensors(store.get(model.sha256, verify=True))
    train = load_npz(store.get(dataset.sha256, verify=True))
    beat.progress("load", 1, 2)

    regularizer = make_regularizer(**regularizer_arguments(model.regularizer))
    problem = Problem.from_spec(
        model.architecture,
        weights,
        model.family,
        regularizer,
        torch.from_numpy(train["X"]),
        torch.from_numpy(train["y"]),
        scope=model.scope,
        device=compute_device(),
    )
    inputs = Inputs(problem=problem, job_id=job.id, sensitive=train.get("sensitive"))

    if test_dataset is not None:
        test = load_npz(store.get(test_dataset.sha256, verify=True))
        rows = np.arange(len(test["y"]))
        if params.test_indices is not None:
            rows = np.asarray(params.test_indices, dtype=np.int64)
            if rows.max() >= len(test["y"]):
                raise SpecError(
                    f"test_indices: index {int(rows.max())} out of range for "
                    f"{len(test['y'])} test rows"
                )
        inputs.test_X, inputs.test_y = test["X"][rows], test["y"][rows]
    beat.progress("load", 2, 2)
    return inputs


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    """A stored dataset: X (float32, n x ...), y, optional sensitive; no pickles."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def compute_device() -> str:
    """The first visible GPU if any (CUDA_VISIBLE_DEVICES picks it), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def library_versions() -> dict[str, str]:
    """Versions that determine a result's numbers, stored with the job."""
    try:
        afif_version = importlib.metadata.version("afif")
    except importlib.metadata.PackageNotFoundError:
        afif_version = "unknown"
    return {
        "afif": afif_version,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cuda": str(torch.version.cuda) if torch.cuda.is_available() else "none",
    }


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses views and non-CPU tensors.
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
