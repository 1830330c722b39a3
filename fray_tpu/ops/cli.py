"""``fray-tpu``: the operator's command line, over the job journal and the Cloud TPU API.

Commands:
  jobs              jobs in the journal: status, slices (count x type), attempts, age, cost so far
  status JOB        one job: status, tasks, counters, cost breakdown, its live slices
  logs JOB          the job's output, progress lines included (--follow: until the job finishes)
  stop JOB          stop a job (through its live controller, or by reattaching when none runs)
  slices            live cloud resources carrying fray-tpu's labels: zone, type, state, age, cost
  gc                list resources no running job owns (orphans); --yes deletes them
  plan TYPE         dry run: zones in try order, VMs, chips, runtime, hourly price; creates nothing
  doctor            before a first real job: credentials, API enabled, zones offering --type,
                    controller position, host bundle delivery; each with its fix; creates nothing
  emulator          serve a Cloud TPU emulator (arguments as ``python -m fray_tpu.emulator``)
  demo              the README's main job: a multislice JAX program on the emulated TPU cloud

jobs, status and logs read the journal read-only, so they work while a controller runs. slices,
gc and stop (without a live controller) call the Cloud TPU API. ``--json`` on jobs, status,
slices, gc and plan prints one JSON document instead of the table.

Configuration: ``--spec`` (default ``$FRAY_CLUSTER_SPEC`` when it is a ``tpu?...`` spec, else
``tpu`` plus the ``FRAY_TPU_*`` variables; see ``fray_tpu.config``), ``--state-dir`` (default: the
spec's state_dir, ``$FRAY_TPU_STATE_DIR``, else ``$XDG_STATE_HOME/fray-tpu``). With emulate=true,
the commands that call the API need the running emulator's endpoint (``emulator_endpoint=``).

Exit codes:
  0  success (status/logs --follow: the job succeeded or is still pending/running)
  1  the job failed or was stopped (status, logs --follow); gc without --yes found orphans;
     doctor found a failing check;
     stop could not see the job stop within --timeout; logs --follow lost the job's controller
  2  usage or configuration error
  3  unknown job id (the message names the closest ids; ``fray-tpu jobs`` lists them)
  4  the Cloud TPU API cannot be reached or refused the call (network, credentials, permissions)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fray_tpu.costs import JobAccount
from fray_tpu.fray_api import JobStatus, is_finished
from fray_tpu.state.journal import ResourceState

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNKNOWN_JOB = 3
EXIT_API = 4

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# The project TpuCluster uses against the emulator when the spec names none.
LOG_POLL_SECONDS = 0.5
STOP_POLL_SECONDS = 0.5
DEFAULT_STOP_TIMEOUT = 120.0
FAILED_STATUSES = (JobStatus.FAILED, JobStatus.STOPPED)


class CliError(Exception):
    """A failure the command reports as one message and an exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------
# Context: configuration, journal and API client of one invocation
# --------------------------------------------------------------------------------------------


class Context:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.spec = resolve_spec(args.spec, os.environ)
        self.state_dir = Path(args.state_dir).expanduser() if args.state_dir else spec_state_dir(self.spec, os.environ)
        self._config = None
        self._journal = None
        self._provisioner = None

    @property
    def config(self):
        """The validated config (the journal commands never need it: no project required)."""
        from fray_tpu.config import TpuClusterConfig

        if self._config is None:
            config = TpuClusterConfig.from_spec(self.spec, environ=os.environ)
            self._config = dataclasses.replace(config, state_dir=str(self.state_dir))
        return self._config

    def journal(self):
        """Every controller's journal of the state directory, read-only: safe while they write."""
        from fray_tpu.state.journals import JournalSet

        if self._journal is None:
            self._journal = JournalSet(self.state_dir)
        return self._journal

    def provisioner(self):
        from fray_tpu.provisioner import RetryPolicy, SliceProvisioner, make_tpu_client

        if self._provisioner is None:
            self.require_endpoint("call the Cloud TPU API")
            client = make_tpu_client(emulator_endpoint=self.config.emulator_endpoint if self.config.emulate else None)
            # An operator at a terminal wants a prompt "cannot reach" over a minute of retries.
            self._provisioner = SliceProvisioner(
                client, self.project, api_timeout=self.config.api_timeout, poll_interval=self.config.poll_interval,
                retry=RetryPolicy(max_attempts=3, max_seconds=15.0),
            )
        return self._provisioner

    @property
    def project(self) -> str:
        from fray_tpu.config import EMULATED_PROJECT

        return self.config.project or EMULATED_PROJECT

    def require_endpoint(self, action: str) -> None:
        if self.config.emulate and not self.config.emulator_endpoint:
            raise CliError(EXIT_USAGE, f"To {action} with emulate=true, name the running emulator: "
                           "--spec 'tpu?emulate=true&emulator_endpoint=HOST:PORT' or FRAY_TPU_EMULATOR_ENDPOINT=HOST:PORT")

    def zones(self) -> list[str]:
        """The zones to list: the config's zones and regions (every zone fray-tpu knows when it
        names none), plus every zone the journal recorded a resource in."""
        from fray_tpu.config import configured_zones

        return sorted({*configured_zones(self.config), *(r.zone for r in self.journal().resources())})

    def close(self) -> None:
        if self._provisioner is not None:
            self._provisioner.close()
        if self._journal is not None:
            self._journal.close()


def resolve_spec(given: str | None, environ: dict | os._Environ) -> str:
    """``--spec``, else ``$FRAY_CLUSTER_SPEC`` when it selects the TPU backend, else ``tpu``
    (the ``FRAY_TPU_*`` variables fill what the spec omits)."""
    if given:
        return given
    from fray_tpu.backend import is_tpu_spec
    from fray_tpu.contract import CLUSTER_SPEC_ENV

    from_env = environ.get(CLUSTER_SPEC_ENV, "").strip()
    if is_tpu_spec(from_env):
        return from_env
    return "tpu"


def spec_state_dir(spec: str, environ) -> Path:
    """The spec's ``state_dir``, else the default (``$FRAY_TPU_STATE_DIR``, ``$XDG_STATE_HOME``...),
    read without validating the rest of the spec."""
    from urllib.parse import parse_qsl

    from fray_tpu.state.journal import default_state_dir

    configured = None
    for key, value in parse_qsl(spec.partition("?")[2], keep_blank_values=True):
        if key.strip().lower().replace("-", "_") == "state_dir":
            configured = value
    return default_state_dir(environ, configured=configured)


# --------------------------------------------------------------------------------------------
# Small helpers: jobs, times, tables
# --------------------------------------------------------------------------------------------


def find_job(journal, wanted: str, state_dir: Path):
    """The job row for an id or a unique id prefix; else exit 3 naming the closest ids."""
    try:
        return journal.job(wanted)
    except KeyError:
        pass
    rows = journal.jobs()
    ids = [row.job_id for row in rows]
    prefixed = [job_id for job_id in ids if job_id.startswith(wanted)]
    if len(prefixed) == 1:
        return journal.job(prefixed[0])
    named = [row.job_id for row in rows if row.name == wanted]
    if len(prefixed) > 1:
        message = f"{wanted!r} is the start of {len(prefixed)} job ids: {', '.join(prefixed[:5])}; give more of the id."
    else:
        message = f"No job {wanted!r} in the journal at {state_dir} ({len(ids)} jobs recorded)."
        names = {row.name for row in rows}
        similar_names = set(difflib.get_close_matches(wanted, names, n=5, cutoff=0.6))
        close = named[:5] or [row.job_id for row in rows if row.name in similar_names][:5] \
            or difflib.get_close_matches(wanted, ids, n=5, cutoff=0.6)
        if close:
            message += f" Did you mean: {', '.join(close)}?"
    message += " `fray-tpu jobs` lists the jobs; for another journal give --state-dir or FRAY_TPU_STATE_DIR."
    raise CliError(EXIT_UNKNOWN_JOB, message)


def status_exit_code(status: str) -> int:
    return EXIT_FAILED if status in FAILED_STATUSES else EXIT_OK


def slices_text(row) -> str:
    return f"{row.slice_count} x {row.tpu_type}" if row.kind == "tpu" else f"{row.slice_count} x cpu"


def attempts_of(row) -> int:
    return int(row.counters.get("attempts", row.attempt))


def human_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def utc_text(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def usd(amount: float) -> str:
    return f"${amount:,.2f}" if amount >= 0.01 or amount == 0 else f"${amount:.4f}"


def render_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def group_by_job(resources) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for resource in resources:
        grouped.setdefault(resource.job_id, []).append(resource)
    return grouped


def resource_dict(resource, now: float) -> dict[str, Any]:
    return {
        "name": resource.name, "zone": resource.zone, "kind": resource.kind, "state": resource.state,
        "tpu_type": resource.tpu_type, "chips": resource.chips, "attempt": resource.attempt,
        "slice": resource.slice_id, "endpoints": len(resource.endpoints), "created": resource.created,
        "age_seconds": round(now - resource.created, 1), "ready_at": resource.ready_at,
    }


# --------------------------------------------------------------------------------------------
# jobs, status, logs: the journal, read-only
# --------------------------------------------------------------------------------------------


def job_summary(row, resources: list, now: float, prices) -> dict[str, Any]:
    from fray_tpu.costs import cost_of

    return {
        "job_id": row.job_id, "name": row.name, "status": row.status, "phase": row.phase, "kind": row.kind,
        "tpu_type": row.tpu_type, "slice_count": row.slice_count, "attempts": attempts_of(row),
        "created": row.created, "finished": row.finished, "age_seconds": round(now - row.created, 1),
        "error_message": row.error_message,
        "live_slices": sum(1 for r in resources if ResourceState(r.state).live),
        "cost": cost_of(row.extra, resources, now, prices).to_dict(),
    }


def cmd_jobs(ctx: Context) -> int:
    from fray_tpu.costs import PriceTable

    journal = ctx.journal()
    prices = PriceTable.from_env()
    now = time.time()
    by_job = group_by_job(journal.resources())
    rows = journal.jobs(unfinished_only=ctx.args.unfinished)
    summaries = [job_summary(row, by_job.get(row.job_id, []), now, prices) for row in rows]
    if ctx.args.json:
        print_json({"state_dir": str(ctx.state_dir), "jobs": summaries})
        return EXIT_OK
    if not rows:
        print(f"no jobs in the journal at {ctx.state_dir}")
        return EXIT_OK
    table = [
        (s["job_id"], s["status"], slices_text(row), s["attempts"], human_age(s["age_seconds"]),
         usd(s["cost"]["estimated_usd"]))
        for row, s in zip(rows, summaries)
    ]
    print(render_table(("JOB", "STATUS", "SLICES", "ATTEMPTS", "AGE", "COST SO FAR"), table))
    return EXIT_OK


def cmd_status(ctx: Context) -> int:
    from fray_tpu.costs import PriceTable

    journal = ctx.journal()
    row = find_job(journal, ctx.args.job, ctx.state_dir)
    now = time.time()
    resources = journal.resources(job_id=row.job_id)
    summary = job_summary(row, resources, now, PriceTable.from_env())
    tasks = [{"name": name, "status": status, "error_message": error}
             for name, (status, error) in zip(row.task_names, row.task_statuses)]
    live = [resource_dict(r, now) for r in resources if ResourceState(r.state).live]
    if ctx.args.json:
        print_json({**summary, "tasks": tasks, "counters": row.counters,
                    "capacity": JobAccount.from_extra(row.extra).capacity, "live_slices": live,
                    "state_dir": str(ctx.state_dir)})
        return status_exit_code(row.status)
    print(render_status(row, summary, tasks, live, now))
    return status_exit_code(row.status)


def render_status(row, summary: dict, tasks: list[dict], live: list[dict], now: float) -> str:
    cost = summary["cost"]
    counters = ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in sorted(row.counters.items())) or "-"
    ended = f"{utc_text(row.finished)} (after {human_age(row.finished - row.created)})" if row.finished else "-"
    capacity = JobAccount.from_extra(row.extra).capacity
    facts = [
        ("job", row.job_id),
        ("name", row.name),
        ("status", row.status + (f" ({row.phase})" if row.phase != row.status else "")),
        ("error", row.error_message or "-"),
        ("slices", slices_text(row) + (f", {capacity}" if capacity else "")),
        ("attempt", str(row.attempt)),
        ("counters", counters),
        ("created", f"{utc_text(row.created)} ({human_age(now - row.created)} ago)"),
        ("finished", ended),
    ]
    width = max(len(label) for label, _ in facts)
    lines = [f"{label.ljust(width)}  {value}" for label, value in facts]
    lines += ["", render_table(("TASK", "STATUS", "ERROR"),
                               ((t["name"], t["status"], t["error_message"] or "") for t in tasks))]
    by_capacity = ", ".join(f"{name} {usd(amount)}" for name, amount in cost["by_capacity"].items())
    lines += ["", "cost so far (chip-hours)", render_table(("", ""), [
        ("provisioned", f"{cost['chip_hours_provisioned']:.4f}"),
        ("running user code", f"{cost['chip_hours_running']:.4f}"),
        ("lost to preemption", f"{cost['chip_hours_lost_preemption']:.4f}"),
        ("booting", f"{cost['chip_hours_boot']:.4f}"),
        ("idle", f"{cost['chip_hours_idle']:.4f}"),
        ("estimated", usd(cost["estimated_usd"]) + (f" ({by_capacity})" if by_capacity else "")),
    ]).split("\n", 1)[1]]
    lines.append("")
    if live:
        lines.append(render_table(("LIVE SLICE", "ZONE", "STATE", "TYPE", "ENDPOINTS", "AGE"), (
            (s["name"], s["zone"], s["state"], s["tpu_type"], s["endpoints"], human_age(s["age_seconds"]))
            for s in live)))
    else:
        lines.append("live slices: none")
    return "\n".join(lines)


def show_line(line: str, which: str) -> str | None:
    """The line as ``logs`` prints it, or None when ``--progress``/``--no-progress`` hides it."""
    from fray_tpu.supervisor.watch import PROGRESS_PREFIX

    progress = line.startswith(PROGRESS_PREFIX)
    if (which == "only" and not progress) or (which == "hide" and progress):
        return None
    return line


def cmd_logs(ctx: Context) -> int:
    journal = ctx.journal()
    row = find_job(journal, ctx.args.job, ctx.state_dir)
    which = "only" if ctx.args.progress_only else "hide" if ctx.args.no_progress else "all"
    cursor = 0
    warned_no_controller = False
    pause = threading.Event()
    while True:
        finished_before_read = is_finished(journal.job(row.job_id).status)
        lines, cursor = journal.output(row.job_id, after=cursor)
        for line in lines:
            shown = show_line(line, which)
            if shown is not None:
                print(shown, flush=True)
        if lines:
            continue  # drain before deciding anything
        if not ctx.args.follow:
            return EXIT_OK
        if finished_before_read:
            return status_exit_code(journal.job(row.job_id).status)
        if not journal.controller_alive(row.job_id):
            if warned_no_controller:
                status = journal.job(row.job_id).status
                print(f"fray-tpu: the controller of job {row.job_id} ({status}) is not running, so the job will not "
                      f"move until one reattaches (any TpuCluster opened on {ctx.state_dir}); stopped following",
                      file=sys.stderr)
                return EXIT_FAILED
            warned_no_controller = True  # look once more: a controller may be restarting
        else:
            warned_no_controller = False
        pause.wait(LOG_POLL_SECONDS)


# --------------------------------------------------------------------------------------------
# stop
# --------------------------------------------------------------------------------------------


def cmd_stop(ctx: Context) -> int:
    journal = ctx.journal()
    row = find_job(journal, ctx.args.job, ctx.state_dir)
    if is_finished(row.status):
        print(f"job {row.job_id} already finished: {row.status}")
        return EXIT_OK
    if not journal.controller_alive(row.job_id):
        try:
            return stop_by_reattaching(ctx, row.job_id)
        except KeyError:
            pass  # another controller adopted the job meanwhile: ask it instead
    return stop_through_controller(ctx, row.job_id)


def stop_through_controller(ctx: Context, job_id: str) -> int:
    from fray_tpu.cluster import request_stop

    request_stop(ctx.state_dir, job_id)
    print(f"asked the controller of job {job_id} to stop it", file=sys.stderr)
    journal = ctx.journal()
    deadline = time.monotonic() + ctx.args.timeout
    pause = threading.Event()
    while time.monotonic() < deadline:
        status = journal.job(job_id).status
        if is_finished(status):
            live = journal.resources(job_id=job_id, live_only=True)
            print(f"job {job_id}: {status}" + (f"; the controller is deleting its {len(live)} slice(s)" if live else ""))
            return EXIT_OK
        pause.wait(STOP_POLL_SECONDS)
    raise CliError(EXIT_FAILED, f"job {job_id} did not stop within {ctx.args.timeout:.0f}s of the request; is its "
                   f"controller responsive? Try again with a longer --timeout")


def stop_by_reattaching(ctx: Context, job_id: str) -> int:
    """No controller runs: become one (reattaching to the job), terminate the job and wait for
    its slices to be deleted. Other unfinished jobs are left running (detach on exit)."""
    from fray_tpu.cluster import TpuCluster
    from fray_tpu.errors import DeadlineExceeded

    if ctx.journal().job(job_id).kind == "tpu":
        ctx.require_endpoint("reattach to a TPU job")
    cluster = TpuCluster(ctx.config, detach_on_exit=True)
    try:
        cluster.journal()
        print(f"the controller of job {job_id} is gone: reattached to stop it", file=sys.stderr)
        cluster.terminate(job_id)
        try:
            cluster.wait_released(job_id, timeout=ctx.args.timeout)
        except DeadlineExceeded as error:
            raise CliError(EXIT_FAILED, f"{error}; run `fray-tpu gc` later to find what is left") from error
        status = str(cluster.poll(job_id).status)
    finally:
        cluster.shutdown(timeout=ctx.args.timeout)
    released = "its slices are deleted" if ctx.journal().job(job_id).kind == "tpu" else "its processes ended with their controller"
    print(f"job {job_id}: {status}; {released}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# slices, gc: the cloud
# --------------------------------------------------------------------------------------------


def cmd_slices(ctx: Context) -> int:
    rows = describe_slices(ctx, ctx.provisioner().list_managed(ctx.zones()))
    if ctx.args.json:
        print_json({"state_dir": str(ctx.state_dir), "slices": rows})
        return EXIT_OK
    if not rows:
        print("no fray-tpu resources alive")
        return EXIT_OK
    print(render_table(("NAME", "ZONE", "TYPE", "STATE", "AGE", "COST SO FAR", "JOB"), (
        (r["name"], r["zone"], r["tpu_type"] or "?",
         r["state"] + (" (self-delete refused)" if r["self_delete_refused"] else ""),
         human_age(r["age_seconds"]) if r["created"] else "?",
         usd(r["usd_so_far"]) if r["usd_so_far"] is not None else "?", warm_text(r) or r["job"] or "?")
        for r in rows)))
    for r in rows:
        if r["self_delete_refused"]:
            print(f"{r['name']}: {r['self_delete_refused']} (it keeps running, and billing, until deleted: "
                  "`fray-tpu gc --yes` deletes it)")
    return EXIT_OK


def warm_text(row: dict[str, Any]) -> str | None:
    if "warm_idle_seconds" not in row:
        return None
    cost = f", {usd(row['warm_idle_usd'])} idle" if row["warm_idle_usd"] is not None else ""
    return f"warm pool: idle {human_age(row['warm_idle_seconds'])}{cost}"


def describe_slices(ctx: Context, observed: list) -> list[dict[str, Any]]:
    """Each observation with its type, age and cost so far: from the journal when it recorded
    the resource, else from the API (one get per resource unknown to this journal)."""
    from fray_tpu import naming
    from fray_tpu.costs import PriceTable, slice_rate, usd_for
    from fray_tpu.ops.gc import self_delete_refusal

    journal = ctx.journal()
    recorded = {(r.name, r.zone): r for r in journal.resources()}
    warm_since = {(p.name, p.zone): p.since for p in journal.warm_periods() if p.until is None}
    jobs = {naming.label_value(row.job_id): row for row in journal.jobs()}
    prices = PriceTable.from_env()
    now = time.time()
    rows = []
    for o in observed:
        resource = recorded.get((o.name, o.zone))
        # The journal knows who holds it now (a slice taken warm keeps its first job's labels).
        job = jobs.get(naming.label_value(resource.job_id) if resource else o.labels.get(naming.LABEL_JOB, ""))
        if resource is not None:
            tpu_type, created = resource.tpu_type, resource.created
            capacity = (JobAccount.from_extra(job.extra).capacity if job else None) or ctx.config.capacity
        else:
            tpu_type, created, capacity = cloud_details(ctx, o)
        chips, price = slice_rate(tpu_type, capacity, prices)
        rows.append({
            "name": o.name, "zone": o.zone, "tpu_type": tpu_type, "state": o.describe(), "health": o.health,
            "queued_state": o.queued_state, "job": job.job_id if job else o.labels.get(naming.LABEL_JOB),
            "job_in_journal": job is not None, "attempt": o.labels.get(naming.LABEL_ATTEMPT),
            "controller": o.labels.get(naming.LABEL_CONTROLLER), "capacity": capacity, "chips": chips,
            "created": created, "age_seconds": round(now - created, 1) if created else None,
            "usd_per_hour": round(usd_for(chips, price, 3600.0), 4) if price is not None else None,
            "usd_so_far": round(usd_for(chips, price, now - created), 4) if price is not None and created else None,
            "self_delete_refused": self_delete_refusal(ctx.provisioner(), o),
        })
        since = warm_since.get((o.name, o.zone))
        if since is not None:
            rows[-1].update(job="(warm pool)", warm_idle_seconds=round(now - since, 1),
                            warm_idle_usd=round(usd_for(chips, price, now - since), 4) if price is not None else None)
    return rows


def cloud_details(ctx: Context, observation) -> tuple[str | None, float | None, str]:
    """(accelerator type, creation time, capacity class) of a resource the journal does not know."""
    from google.api_core import retry as api_retry

    client = ctx.provisioner().client
    policy = api_retry.Retry(initial=0.5, maximum=5.0, timeout=15.0, predicate=api_retry.if_transient_error)
    if "/queuedResources/" in observation.resource_name:  # a queued resource whose node does not exist yet
        queued = client.get_queued_resource(name=observation.resource_name, timeout=ctx.config.api_timeout,
                                            retry=policy)
        node_specs = list(queued.tpu.node_spec)
        tpu_type = node_specs[0].node.accelerator_type if node_specs else None
        capacity = "spot" if "spot" in queued else "reserved" if "guaranteed" in queued else "on-demand"
        return tpu_type or None, _epoch(queued.create_time), capacity
    node = client.get_node(name=observation.resource_name, timeout=ctx.config.api_timeout, retry=policy)
    scheduling = node.scheduling_config
    capacity = ("spot" if scheduling.spot else "preemptible" if scheduling.preemptible
                else "reserved" if scheduling.reserved else "on-demand")
    return node.accelerator_type or None, _epoch(node.create_time), capacity


def _epoch(timestamp) -> float | None:
    try:
        value = timestamp.timestamp()
    except (AttributeError, ValueError, OSError):
        return None
    return value if value > 0 else None


def cmd_gc(ctx: Context) -> int:
    from fray_tpu.ops.gc import collect

    journal = ctx.journal()
    live_jobs = [row.job_id for row in journal.jobs(unfinished_only=True)]
    if not journal.jobs():
        print(f"fray-tpu: the journal at {ctx.state_dir} has no jobs, so every fray-tpu resource in the project counts "
              "as an orphan; give --state-dir of the controller whose jobs must be kept", file=sys.stderr)
    report: Callable[[str], None] = (lambda line: None) if ctx.args.json else print
    zones = ctx.zones()
    orphans = collect(ctx.provisioner(), zones, live_jobs, delete=ctx.args.yes,
                      delete_deadline=ctx.config.delete_deadline, report=report, owned=journal.owned_slices())
    if ctx.args.json:
        print_json({"state_dir": str(ctx.state_dir), "zones": zones, "live_jobs": live_jobs,
                    "orphans": [o.to_dict() for o in orphans], "deleted": bool(ctx.args.yes and orphans)})
    elif not orphans:
        print(f"no orphans in {len(zones)} zone(s)")
    elif not ctx.args.yes:
        print(f"{len(orphans)} orphan(s); `fray-tpu gc --yes` deletes them")
    return EXIT_FAILED if orphans and not ctx.args.yes else EXIT_OK


# --------------------------------------------------------------------------------------------
# plan, emulator, demo
# --------------------------------------------------------------------------------------------


def cmd_plan(ctx: Context) -> int:
    from fray_tpu.costs import PriceTable
    from fray_tpu.ops.plan_report import plan_report

    regions = [r.strip() for r in ctx.args.regions.split(",") if r.strip()] if ctx.args.regions else None
    report = plan_report(ctx.args.tpu_type, ctx.args.slices, regions, ctx.args.capacity, ctx.config,
                         PriceTable.from_env(), preemptible=not ctx.args.not_preemptible)
    if ctx.args.json:
        print_json(report.to_dict())
    else:
        print(report.render_text())
    return EXIT_OK


def cmd_doctor(ctx: Context) -> int:
    import google.auth
    from google.auth import exceptions as auth_exceptions

    from fray_tpu.ops.doctor import FAIL, Check, describe_credentials, metadata_position, run_checks
    from fray_tpu.tpu_client import CLOUD_PLATFORM_SCOPE, make_tpu_client

    ctx.require_endpoint("check the Cloud TPU API")
    if ctx.config.emulate:
        client = make_tpu_client(emulator_endpoint=ctx.config.emulator_endpoint)
        found = "anonymous credentials (the emulator takes no others)"
    else:
        try:
            credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
        except auth_exceptions.DefaultCredentialsError as error:
            checks = [Check("credentials", FAIL, f"none found ({error})",
                            "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS "
                            "to a service-account key file, or run on a GCP VM with a service account")]
            return _print_checks(ctx, checks)
        client = make_tpu_client(emulator_endpoint=None, credentials=credentials)
        found = describe_credentials(credentials)
    try:
        checks = run_checks(ctx.config, client, ctx.project, ctx.args.type or [], credentials_found=found,
                            position=metadata_position)
    finally:
        client.transport.close()
    return _print_checks(ctx, checks)


def _print_checks(ctx: Context, checks) -> int:
    from fray_tpu.ops.doctor import FAIL

    if ctx.args.json:
        print_json({"checks": [c.to_dict() for c in checks]})
    else:
        for check in checks:
            print(check.render())
    return EXIT_FAILED if any(c.status == FAIL for c in checks) else EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    import runpy

    program = EXAMPLES / "multislice_jax.py"
    if not program.exists():
        raise CliError(EXIT_USAGE, f"fray-tpu demo runs {program}, which ships with the source checkout only")
    namespace = runpy.run_path(str(program))
    return namespace["main"]()


def cmd_emulator(emulator_args: list[str]) -> int:
    from fray_tpu.emulator.__main__ import main as emulator_main

    return emulator_main(emulator_args[1:] if emulator_args[:1] == ["--"] else emulator_args)


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # Global options are accepted before or after the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--spec", default=argparse.SUPPRESS,
                        help="cluster spec 'tpu?key=value&...' (default: $FRAY_CLUSTER_SPEC when it is a tpu spec, "
                             "else 'tpu' with the FRAY_TPU_* variables)")
    common.add_argument("--state-dir", default=argparse.SUPPRESS,
                        help="the controller's journal directory (default: the spec's, $FRAY_TPU_STATE_DIR, "
                             "else $XDG_STATE_HOME/fray-tpu)")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print one JSON document")

    description, _, epilog = __doc__.partition("Exit codes:")
    parser = argparse.ArgumentParser(prog="fray-tpu", parents=[common], description=description,
                                     epilog="exit codes:" + epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[Context], int], help: str, parents=(common,)) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=list(parents), help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    jobs = command("jobs", cmd_jobs, "jobs in the journal, newest first", (common, as_json))
    jobs.add_argument("--unfinished", action="store_true", help="only jobs still pending or running")
    command("status", cmd_status, "one job: status, tasks, counters, cost, live slices (exit 1: failed/stopped)",
            (common, as_json)).add_argument("job", help="job id (or a unique start of one)")
    logs = command("logs", cmd_logs, "the job's output, its [fray-tpu] progress lines included")
    logs.add_argument("job", help="job id (or a unique start of one)")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing until the job finishes (exit 1 if it failed or was stopped)")
    shown = logs.add_mutually_exclusive_group()
    shown.add_argument("--progress-only", action="store_true", help="only fray-tpu's progress lines")
    shown.add_argument("--no-progress", action="store_true", help="only the tasks' output")
    stop = command("stop", cmd_stop, "stop a job and wait until it shows stopped")
    stop.add_argument("job", help="job id (or a unique start of one)")
    stop.add_argument("--timeout", type=float, default=DEFAULT_STOP_TIMEOUT,
                      help=f"seconds to wait for the job to stop (default {DEFAULT_STOP_TIMEOUT:.0f})")
    command("slices", cmd_slices, "live fray-tpu resources in the configured zones", (common, as_json))
    gc = command("gc", cmd_gc, "list resources no running job owns (exit 1 when some are found without --yes)",
                 (common, as_json))
    gc.add_argument("--yes", action="store_true", help="delete the orphans (and wait until they are gone)")
    plan = command("plan", cmd_plan, "dry run of N slices of a TPU type; creates nothing", (common, as_json))
    plan.add_argument("tpu_type", metavar="TYPE", help="TPU type, e.g. v5litepod-16")
    plan.add_argument("--slices", type=int, default=1, help="number of slices (default 1)")
    plan.add_argument("--regions", help="comma list of regions or zones to narrow the config's")
    plan.add_argument("--capacity", help="spot | preemptible | on-demand | reserved (default: the config's)")
    plan.add_argument("--not-preemptible", action="store_true",
                      help="the job must not be preempted (spot/preemptible become on-demand)")
    doctor = command("doctor", cmd_doctor, "check credentials, API, zones, network and delivery before a first "
                     "real job; creates nothing (exit 1 when a check fails)", (common, as_json))
    doctor.add_argument("--type", action="append", metavar="TYPE",
                        help="a TPU type whose zones and runtime version to check (repeatable)")
    commands.add_parser("demo", help="run a multislice JAX job on the emulated TPU cloud").set_defaults(run=None)
    # add_help=False: --help and every other option go to the emulator's own parser.
    commands.add_parser("emulator", add_help=False,
                        help="serve a Cloud TPU emulator (arguments as python -m fray_tpu.emulator)").set_defaults(run=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "emulator":
        return cmd_emulator(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    for name, default in (("spec", None), ("state_dir", None), ("verbose", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            return cmd_demo(args)
        return run_command(args)
    except CliError as error:
        print(f"fray-tpu {args.command}: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        return 130


def run_command(args: argparse.Namespace) -> int:
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions

    from fray_tpu.errors import ConfigError, CredentialsError, ProvisioningError
    from fray_tpu.state.journal import JournalError

    ctx = None
    try:
        ctx = Context(args)
        return args.run(ctx)
    except (ConfigError, JournalError) as error:
        raise CliError(EXIT_USAGE, str(error)) from error
    except (ProvisioningError, CredentialsError, api_exceptions.GoogleAPIError, auth_exceptions.GoogleAuthError) as error:
        raise CliError(EXIT_API, f"the Cloud TPU API could not be used: {error}") from error
    finally:
        if ctx is not None:
            ctx.close()


if __name__ == "__main__":
    sys.exit(main())
