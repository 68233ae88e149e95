"""Request and response schemas of the HTTP API (pydantic v2; imports only pydantic + stdlib).

The client SDK imports this module, so it stays free of SQLAlchemy, torch and FastAPI.
Per resource: `*Create` (what a caller sends), `*Public` (what the API answers) and
`*ListPublic` (a page of items plus `next_cursor`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Family = Literal["bernoulli", "categorical", "gaussian", "poisson"]
JobKind = Literal["unlearning", "attribution", "fairness", "cv"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Method = Literal["fisher", "hessian"]
Solver = Literal["auto", "lissa", "cg", "exact"]
JOB_KINDS: tuple[str, ...] = ("unlearning", "attribution", "fairness", "cv")
JOB_STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")

Index = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    """Refuses unknown fields, so a misspelt option is an error rather than ignored."""

    model_config = ConfigDict(extra="forbid")


# --- models -------------------------------------------------------------------------------


class RegularizerSpec(_Strict):
    """Penalty λ·π(θ) added to the mean training loss; `exclude` lists unpenalized params.

    Kinds: none, l2 (λ·½‖θ‖²), l1 (λ‖θ‖₁), elastic_net (λ(α‖θ‖₁ + (1−α)½‖θ‖²) with
    α = `l1_ratio`), group_lasso (λ Σ_g ‖θ_g‖₂ over `groups`, one group per tensor by default).
    """

    kind: str = Field(min_length=1, max_length=32, examples=["l2"])
    strength: float = Field(ge=0, allow_inf_nan=False, examples=[0.001])
    exclude: list[str] = Field(default_factory=list)
    l1_ratio: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False,
        description="elastic_net only: α, the l1 share of the penalty (None: the engine's 0.5).",
    )
    groups: list[Annotated[list[str], Field(min_length=1)]] | None = Field(
        None, min_length=1,
        description="group_lasso only: groups of parameter names penalized by their joint "
        "Euclidean norm (None: each parameter tensor is a group).",
        examples=[[["0.weight"], ["2.weight", "2.bias"]]],
    )


class ModelCreate(_Strict):
    """The `spec` part of `POST /v1/models` (weights travel as a safetensors file part)."""

    name: str = Field(min_length=1, max_length=200)
    architecture: dict[str, Any] = Field(description='Engine format: {"layers": [...]}')
    family: Family
    regularizer: RegularizerSpec
    scope: list[str] | None = Field(
        None, description="Parameter names the influence computations cover (None = all)."
    )


class ModelPublic(BaseModel):
    id: str
    name: str
    family: Family
    architecture: dict[str, Any]
    regularizer: dict[str, Any]
    scope: list[str] | None = None
    n_parameters: int
    sha256: str
    size_bytes: int
    parent_id: str | None = None
    removed_indices: list[int] | None = None
    source_job_id: str | None = None
    created_at: datetime


class ModelListPublic(BaseModel):
    items: list[ModelPublic]
    next_cursor: str | None = None


# --- datasets -----------------------------------------------------------------------------


class DatasetMeta(_Strict):
    """The optional `meta` part of `POST /v1/datasets`; column names matter for csv/parquet."""

    name: str | None = Field(None, max_length=200)
    features: list[str] | None = Field(None, min_length=1)
    target: str | None = None
    sensitive: str | None = None


class DatasetPublic(BaseModel):
    id: str
    name: str
    n_rows: int
    n_features: int
    feature_shape: list[int]
    y_dtype: str
    has_sensitive: bool
    source_format: str
    sha256: str
    size_bytes: int
    created_at: datetime


class DatasetListPublic(BaseModel):
    items: list[DatasetPublic]
    next_cursor: str | None = None


# --- job params ---------------------------------------------------------------------------


class JobParams(_Strict):
    """Options every kind shares: curvature `method`, linear `solver` and its options."""

    method: Method = "fisher"
    solver: Solver = "auto"
    solver_options: dict[str, Any] = Field(
        default_factory=dict, description="Passed to the engine's solver (e.g. tol, max_iter)."
    )


class UnlearningParams(JobParams):
    """Remove training rows `remove` (indices into the training dataset) by one Newton step."""

    remove: list[Index] = Field(min_length=1)
    refine_steps: int = Field(0, ge=0, le=100)

    @model_validator(mode="after")
    def _distinct(self) -> UnlearningParams:
        if len(set(self.remove)) != len(self.remove):
            raise ValueError("remove: row indices must be distinct")
        return self


class AttributionParams(JobParams):
    """Score every training row by its effect on the mean loss over the chosen test rows."""

    test_dataset_id: str
    test_indices: list[Index] | None = Field(None, min_length=1)
    top_k: int = Field(10, ge=1, le=1000)


class FairnessParams(JobParams):
    """Score rows by their effect on a fairness metric; optionally unlearn the worst."""

    metric: Literal["demographic_parity", "chi2"] = "demographic_parity"
    unlearn: bool = True
    policy: Literal["auto", "all"] = "auto"
    max_fraction: float = Field(0.2, gt=0, le=1)
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)


# Most folds one cv job evaluates (one right-hand side and one result entry per fold).
MAX_CV_FOLDS = 1000


class CvParams(JobParams):
    """Approximate cross-validation over disjoint held-out folds of shuffled rows.

    k=None: `folds` parts of about n/folds rows. k set: `folds` folds of exactly k rows.
    folds=None: leave-k-out over the whole set, n // k folds of k rows (k defaults to 1,
    leave-one-out); every row is held out once when k divides n. At most MAX_CV_FOLDS folds.
    """

    k: int | None = Field(None, ge=1)
    folds: int | None = Field(
        5, ge=1, le=MAX_CV_FOLDS,
        description="Number of folds; null: n // k folds (leave-k-out over the whole set).",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _leave_k_out(self) -> CvParams:
        # Stored params say what ran: folds=null with no k is leave-one-out.
        if self.folds is None and self.k is None:
            self.k = 1
        return self


PARAMS_BY_KIND: dict[str, type[JobParams]] = {
    "unlearning": UnlearningParams,
    "attribution": AttributionParams,
    "fairness": FairnessParams,
    "cv": CvParams,
}


class JobCreate(_Strict):
    """Body of `POST /v1/jobs`; `params` is checked against the schema of `kind`."""

    kind: JobKind
    model_id: str
    dataset_id: str = Field(description="The training set.")
    params: dict[str, Any] = Field(default_factory=dict)


# --- jobs ---------------------------------------------------------------------------------


class JobProgress(BaseModel):
    phase: str | None = None
    done: int = 0
    total: int = 0


class JobError(BaseModel):
    code: str
    message: str


class JobPublic(BaseModel):
    id: str
    kind: JobKind
    status: JobStatus
    model_id: str
    dataset_id: str
    params: dict[str, Any]
    progress: JobProgress = Field(default_factory=JobProgress)
    timings: dict[str, float] = Field(default_factory=dict)
    device: str | None = None
    error: JobError | None = None
    attempts: int = Field(0, description="How many times a worker has started this job.")
    versions: dict[str, str] | None = Field(
        None, description="Library versions (afif, torch, numpy, python, cuda) of the worker "
        "that produced the result; None until a worker completes the job.",
    )
    cancel_requested: bool = False
    result_url: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobListPublic(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None = None


class ArrayRef(BaseModel):
    """Stands in for an array too large to inline; download it (.npy) from `artifact`."""

    artifact: str
    shape: list[int]
    dtype: str


ArrayField = list[Any] | ArrayRef


class _Result(BaseModel):
    """Every kind's result also says whether its linear solves converged."""

    model_config = ConfigDict(extra="allow")

    converged: bool | None = Field(
        None,
        description="True when every linear solve (and proximal step) of the job converged; "
        "False means the numbers are approximate (see the solver reports). "
        "None only on results stored before this field existed.",
    )
    max_relative_residual: float | None = Field(
        None,
        description="Largest relative residual ‖Cx − v‖/‖v‖ over the job's solves; None when "
        "no solve ran or a residual was not finite.",
    )


class UnlearningResult(_Result):
    model_id: str
    n_removed: int
    parameter_change_norm: float | None = None
    solver: dict[str, Any] | None = None


class AttributionResult(_Result):
    scores: ArrayField
    convention: str = "removal"


class FairnessResult(_Result):
    scores: ArrayField
    metric_before: float | None = None
    metric_after: float | None = None
    n_removed: int = 0
    removed: ArrayField | None = None
    model_id: str | None = None


class CvFold(BaseModel):
    model_config = ConfigDict(extra="allow")

    indices: ArrayField
    loss: float | None = None


class CvResult(_Result):
    estimate: float | None = None
    per_fold: list[CvFold] = Field(default_factory=list)


RESULT_BY_KIND: dict[str, type[_Result]] = {
    "unlearning": UnlearningResult,
    "attribution": AttributionResult,
    "fairness": FairnessResult,
    "cv": CvResult,
}


# --- problems -----------------------------------------------------------------------------


class Problem(BaseModel):
    """RFC 9457 problem details, served as application/problem+json."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    field: str | None = None
    code: str | None = None
