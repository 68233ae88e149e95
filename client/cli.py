"""Client half of the `afif` command: models, datasets, jobs and submit.

`service/cli.py` hands `afif models|datasets|jobs|submit ...` to `main(argv)` here. The
server URL and API key come from --url/--key or AFIF_URL/AFIF_API_KEY.

Exit status: 0 success, 2 bad usage, 3 the server refused a request or could not be
reached, 4 the job failed, 5 the job was cancelled.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client import errors
from client.api import Client, Job

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_API = 3
EXIT_JOB_FAILED = 4
EXIT_JOB_CANCELLED = 5

KINDS = ("unlearning", "attribution", "fairness", "cv")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help="server URL (default $AFIF_URL)")
    common.add_argument("--key", default=None, help="API key (default $AFIF_API_KEY)")
    common.add_argument("--output", "-O", choices=("text", "json"), default="text",
                        help="text tables (default) or JSON")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of the client subcommands."""
    common = _common()
    parser = argparse.ArgumentParser(
        prog="afif", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    top = parser.add_subparsers(dest="resource", required=True, metavar="COMMAND")

    models = top.add_parser("models", help="list, show or download models")
    m = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    m.add_parser("list", parents=[common], help="all models")
    show = m.add_parser("show", parents=[common], help="one model")
    show.add_argument("id")
    dl = m.add_parser("download", parents=[common], help="save the weights (safetensors)")
    dl.add_argument("id")
    dl.add_argument("-o", "--out", required=True, help="file to write")

    datasets = top.add_parser("datasets", help="list, show or upload datasets")
    d = datasets.add_subparsers(dest="action", required=True, metavar="ACTION")
    d.add_parser("list", parents=[common], help="all datasets")
    show = d.add_parser("show", parents=[common], help="one dataset")
    show.add_argument("id")
    up = d.add_parser("upload", parents=[common], help="upload a .npz, .csv or .parquet file")
    up.add_argument("file")
    up.add_argument("--name")
    up.add_argument("--features", help="comma-separated feature columns (tables)")
    up.add_argument("--target", help="target column (tables)")
    up.add_argument("--sensitive", help="sensitive-attribute column (tables)")

    jobs = top.add_parser("jobs", help="list, show, wait for, cancel jobs; fetch results")
    j = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = j.add_parser("list", parents=[common], help="jobs, newest first")
    ls.add_argument("--status", choices=("queued", "running", "succeeded", "failed",
                                         "cancelled"))
    ls.add_argument("--kind", choices=KINDS)
    ls.add_argument("--limit", type=int, default=None, help="page size")
    for action, text in (("show", "one job"), ("cancel", "cancel a job")):
        sub = j.add_parser(action, parents=[common], help=text)
        sub.add_argument("id")
    wait = j.add_parser("wait", parents=[common], help="wait with a progress bar")
    wait.add_argument("id")
    wait.add_argument("--timeout", type=float, default=None, help="seconds")
    wait.add_argument("--no-progress", action="store_true", help="no progress bar")
    res = j.add_parser("result", parents=[common], help="print a succeeded job's result")
    res.add_argument("id")
    res.add_argument("--save", metavar="DIR",
                     help="also write result.json and every array artifact as .npy")

    submit = top.add_parser("submit", parents=[common], help="submit a job")
    submit.add_argument("kind", choices=KINDS)
    submit.add_argument("--model", required=True, help="model id")
    submit.add_argument("--dataset", required=True, help="training dataset id")
    submit.add_argument("--param", "-p", action="append", default=[], metavar="K=V",
                        help="one parameter; V is read as JSON if it parses, else a string")
    submit.add_argument("--params", default=None, metavar="JSON",
                        help="all parameters as a JSON object (--param entries override)")
    submit.add_argument("--idempotency-key", default=None)
    submit.add_argument("--wait", action="store_true", help="wait and print the result")
    submit.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_params(params_json: str | None, pairs: Sequence[str]) -> dict[str, Any]:
    """Merge --params JSON and --param k=v pairs (values parsed as JSON when they parse)."""
    params: dict[str, Any] = {}
    if params_json:
        loaded = json.loads(params_json)
        if not isinstance(loaded, dict):
            raise ValueError("--params must be a JSON object")
        params.update(loaded)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {pair!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def main(argv: Sequence[str] | None = None) -> int:
    """Run one client command; return the exit status (see module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0)

    try:
        with Client(args.url, args.key) as client:
            return _dispatch(client, args)
    except ValueError as exc:
        print(f"afif: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except errors.JobFailed as exc:
        print(f"afif: job {exc.job_id} failed ({exc.code}): {exc.message}", file=sys.stderr)
        return EXIT_JOB_FAILED
    except errors.JobCancelled as exc:
        print(f"afif: job {exc.job_id} was cancelled", file=sys.stderr)
        return EXIT_JOB_CANCELLED
    except errors.ApiError as exc:
        print(f"afif: {exc}", file=sys.stderr)
        return EXIT_API
    except errors.AfifError as exc:
        print(f"afif: {exc}", file=sys.stderr)
        return EXIT_API


def _dispatch(client: Client, args: argparse.Namespace) -> int:
    out = args.output
    if args.resource == "models":
        if args.action == "list":
            _print_rows(client.list_models(), ("id", "name", "family", "n_parameters",
                                               "parent_id", "created_at"), out)
        elif args.action == "show":
            _print_one(client.get_model(args.id), out)
        else:
            blob = client.request("GET", f"/v1/models/{args.id}/weights", expect="bytes")
            Path(args.out).write_bytes(blob)
            _print_one({"id": args.id, "path": args.out, "bytes": len(blob)}, out)
        return EXIT_OK

    if args.resource == "datasets":
        if args.action == "list":
            _print_rows(client.list_datasets(), ("id", "name", "n_rows", "n_features",
                                                 "created_at"), out)
        elif args.action == "show":
            _print_one(client.get_dataset(args.id), out)
        else:
            features = args.features.split(",") if args.features else None
            _print_one(client.upload_dataset_file(
                args.file, name=args.name, features=features, target=args.target,
                sensitive=args.sensitive), out)
        return EXIT_OK

    if args.resource == "jobs":
        return _jobs(client, args)

    params = parse_params(args.params, args.param)
    job = client.submit(args.kind, model=args.model, dataset=args.dataset,
                        idempotency_key=args.idempotency_key, **params)
    if not args.wait:
        _print_one(job.info, out)
        return EXIT_OK
    job.wait(progress=not args.no_progress and out == "text")
    _print_result(client.raw_result(job.id), out)
    return EXIT_OK


def _jobs(client: Client, args: argparse.Namespace) -> int:
    out = args.output
    if args.action == "list":
        rows = client.list_jobs(status=args.status, kind=args.kind, limit=args.limit)
        _print_rows([j.info for j in rows], ("id", "kind", "status", "progress",
                                             "created_at", "finished_at"), out)
        return EXIT_OK
    if args.action == "show":
        job = client.job(args.id)
        _print_one(job.info, out)
        return _exit_for(job)
    if args.action == "cancel":
        job = client.cancel(args.id)
        _print_one(job.info, out)
        return EXIT_OK
    if args.action == "wait":
        job = client.job(args.id)
        job.wait(progress=not args.no_progress and out == "text", timeout=args.timeout,
                 raise_on_failure=False)
        if out == "json":
            _print_one(job.info, out)
        else:
            print(f"job {job.id}: {job.status}")
        job.raise_for_status()
        return EXIT_OK

    # result
    raw = client.raw_result(args.id)
    if args.save:
        _save_result(client, raw, Path(args.save))
    _print_result(raw, out)
    return EXIT_OK


def _exit_for(job: Job) -> int:
    status = str(job.status)
    if status == "failed":
        err = job.info.error
        code = getattr(err, "code", None) or (err or {}).get("code", "unknown")
        message = getattr(err, "message", None) or (err or {}).get("message", "")
        print(f"afif: job {job.id} failed ({code}): {message}", file=sys.stderr)
        return EXIT_JOB_FAILED
    if status == "cancelled":
        return EXIT_JOB_CANCELLED
    return EXIT_OK


def _save_result(client: Client, raw: dict[str, Any], folder: Path) -> None:
    """Write result.json and each artifact as <name>.npy (flat names from the JSON path)."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(raw, indent=2))

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            if "artifact" in value and "shape" in value:
                np.save(folder / f"{path or 'array'}.npy", client.artifact(value["artifact"]),
                        allow_pickle=False)
                return
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}.{i}")

    walk(raw, "")


def _plain(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    return obj


def _print_one(obj: Any, out: str) -> None:
    data = _plain(obj)
    if out == "json":
        print(json.dumps(data, indent=2, default=str))
        return
    width = max((len(k) for k in data), default=0)
    for key, value in data.items():
        text = json.dumps(value, default=str) if isinstance(value, dict | list) else value
        print(f"{key:<{width}}  {text}")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict) and {"phase", "done", "total"} <= value.keys():
        return f"{value['phase']} {value['done']}/{value['total']}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def _print_rows(items: Sequence[Any], columns: Sequence[str], out: str) -> None:
    rows = [_plain(item) for item in items]
    if out == "json":
        print(json.dumps(rows, indent=2, default=str))
        return
    table = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in table]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _print_result(raw: dict[str, Any], out: str) -> None:
    if out == "json":
        print(json.dumps(raw, indent=2, default=str))
        return
    for key, value in raw.items():
        if isinstance(value, dict) and "artifact" in value:
            print(f"{key}: array {value.get('dtype', '')}{value.get('shape')} "
                  f"at {value['artifact']}")
        elif isinstance(value, list) and len(value) > 12:
            print(f"{key}: list of {len(value)}, first: {json.dumps(value[:5], default=str)}")
        else:
            print(f"{key}: {json.dumps(value, default=str)}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
