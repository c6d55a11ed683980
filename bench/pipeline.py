"""Cold and warm wall time of the whole pipeline: `mlflow run <project> --env-manager local`
(entry point main) twice against a fresh, throwaway SQLite tracking store or a tracking server,
with each step's seconds and evaluate's phases.

    python -m bench.pipeline [--model smollm2-135m] [--compute cpu] [--cold-cache] [--dry-run]
        [--tracking-uri URI] [--overrides "evaluate.ask=all ..."] [--out bench/results]

The store is a new temp folder's mlflow.db (MLFLOW_TRACKING_URI), or --tracking-uri (a server:
MLflow's own MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN pass through from the environment);
the experiment is new each time, `bench-pipeline-<temp folder>` through MLFLOW_EXPERIMENT_NAME.
`mlflow run` runs in that folder, as the tests run it: for a SQLite store MLflow puts the runs'
artifacts under ./mlruns of the current directory. --overrides is passed to both runs as
`-P overrides=...` (e.g. asking as before evaluate.ask, all but the per-item traces:
"evaluate.ask=all evaluate.share_answers_below_kld=null evaluate.timed_items=24
evaluate.fidelity.scored_tokens=4096").

- cold: the first run into the empty store, so every step runs. The snapshot cache under
  XDG_CACHE_HOME (fetched snapshots, GGUF conversions, ONNX builds) stays as it is, unless
  --cold-cache gives the run an empty temp XDG_CACHE_HOME, so the conversion and the ONNX build
  happen too (and a Hub download, for a model that is not bundled, unless HF_HOME or
  HF_HUB_CACHE is set).
- warm: the same command again; `main` reuses every step. The table says how many steps each
  run reused, read from its parent run's `main.<step>.reused` tags: fewer than all when the
  checkout changed between the two runs (the reuse key includes the uncommitted changes).

A second table splits each run by step (main's `seconds.<step>` metrics: submission to end,
process start included) and evaluate by phase (its run's `seconds.<phase>` metrics).

Each run's output streams to cold.log / warm.log in the temp folder. On success the temp folder
is removed; if a run fails, its log's tail is printed and the folder is kept. --dry-run prints
the command, its working directory and the environment changes, and runs nothing. Results:
--out/pipeline.json and --out/pipeline.md (also printed; pipeline-cold-cache.* with
--cold-cache), and a run `bench-pipeline` (`bench-pipeline-cold-cache`) in the bench's own
tracking store.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow import MlflowClient

from bench.models import add_model_arguments, tracking_uri
from bench.reporting import provenance, write_report
from steps.evaluation.report import phase_seconds
from steps.tracking.provenance import PROJECT_ROOT
from steps.tracking.server import redacted

# What reaches `mlflow run` from this process's MLFLOW_ settings: a login for a server.
PASSED_THROUGH = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"}


@dataclass(frozen=True)
class Invocation:
    command: list[str]
    cwd: Path
    env: dict[str, str]
    tracking_uri: str
    experiment: str


@dataclass(frozen=True)
class Timing:
    name: str  # cold or warm
    wall_s: float
    exit_status: int
    steps_reused: int
    steps: int
    step_seconds: dict[str, float]  # the steps that ran (not reused)
    evaluate_phases: dict[str, float]  # when evaluate ran


def invocation(
    folder: Path, model: str, compute: str, cold_cache: bool, server: str | None = None,
    overrides: str = "",
) -> Invocation:  # fmt: skip
    store = server or tracking_uri(folder)
    experiment = folder.name  # bench-pipeline-<random>
    command = [
        sys.executable, "-m", "mlflow", "run", str(PROJECT_ROOT), "--env-manager", "local",
        "-e", "main", "-P", f"model={model}", "-P", f"compute={compute}",
    ]  # fmt: skip
    if overrides:
        command += ["-P", f"overrides={overrides}"]
    # Stray MLFLOW_ settings (MLFLOW_RUN_ID above all) would send the runs elsewhere. HF_
    # settings stay: a model that is not bundled needs the user's Hub token and cache.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") or k in PASSED_THROUGH
    }
    env |= {
        # `mlflow run --env-manager local` resolves `python` from PATH: this interpreter's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": store,
        "MLFLOW_EXPERIMENT_NAME": experiment,
    }
    if cold_cache:
        env["XDG_CACHE_HOME"] = str(folder / "cache")
    return Invocation(command, folder, env, store, experiment)


def describe(run: Invocation) -> str:
    """The command, where it runs, and what differs from this process's environment."""
    changed = {k: v for k, v in run.env.items() if os.environ.get(k) != v}
    removed = sorted(set(os.environ) - set(run.env))
    lines = [f"cwd: {run.cwd}", f"command: {' '.join(run.command)}", "env set:"]
    lines += [
        f"  {key}={redacted(value) if key == 'MLFLOW_TRACKING_URI' else value}"
        for key, value in sorted(changed.items())
        if key not in PASSED_THROUGH
    ]
    lines.append(f"env removed: {', '.join(removed) or '(none)'}")
    return "\n".join(lines)


def timed_run(run: Invocation, log: Path) -> tuple[float, int]:
    """Wall seconds and exit status of one `mlflow run`, its output streamed to `log`."""
    with log.open("wb") as sink:
        started = time.perf_counter()
        process = subprocess.run(
            run.command, cwd=run.cwd, env=run.env, stdout=sink, stderr=subprocess.STDOUT
        )
        wall = time.perf_counter() - started
    return wall, process.returncode


@dataclass(frozen=True)
class Recorded:
    """What one `main` parent run recorded about its steps."""

    reused: int
    steps: int
    step_seconds: dict[str, float]
    evaluate_phases: dict[str, float]


def recorded(run: Invocation) -> list[Recorded]:
    """Each `main` parent run of the experiment, oldest first: its steps reused, each step's
    seconds, and evaluate's phases when evaluate ran."""
    client = MlflowClient(run.tracking_uri)
    experiment = client.get_experiment_by_name(run.experiment)
    parents = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`pipeline.step` = 'main'",
        order_by=["attributes.start_time ASC"],
    )
    found = []
    for parent in parents:
        tags, metrics = parent.data.tags, parent.data.metrics
        reused = [v for k, v in tags.items() if k.endswith(".reused")]
        steps = {
            k.removeprefix("seconds."): v for k, v in metrics.items() if k.startswith("seconds.")
        }
        phases = {}
        if tags.get("main.evaluate.reused") == "false":
            evaluated = client.get_run(tags["main.evaluate.run_id"]).data.metrics
            phases = phase_seconds(evaluated, total=True)
        found.append(Recorded(reused.count("true"), len(reused), steps, phases))
    return found


def measure(run: Invocation) -> list[Timing]:
    walls = []
    for name in ("cold", "warm"):
        log = run.cwd / f"{name}.log"
        wall, status = timed_run(run, log)
        print(f"{name}: {wall:.1f} s, exit status {status}", flush=True)
        if status != 0:
            print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
            raise SystemExit(
                f"the {name} `mlflow run` exited with {status}; its log (tail above): {log}"
            )
        walls.append((name, wall, status))
    return [
        Timing(name, wall, status, r.reused, r.steps, r.step_seconds, r.evaluate_phases)
        for (name, wall, status), r in zip(walls, recorded(run), strict=True)
    ]


def markdown(timings: list[Timing]) -> str:
    cold, warm = timings
    lines = [
        "| run | wall s | exit status | steps reused |",
        "|---|---:|---:|---:|",
        *(
            f"| {t.name} | {t.wall_s:.1f} | {t.exit_status} | {t.steps_reused}/{t.steps} |"
            for t in timings
        ),
        "",
        f"warm / cold: {warm.wall_s / cold.wall_s:.3f}",
        "",
        "| step or evaluate phase | cold s | warm s |",
        "|---|---:|---:|",
    ]
    for step in cold.step_seconds | warm.step_seconds:
        cells = [
            f"{t.step_seconds[step]:.1f}" if step in t.step_seconds else "reused" for t in timings
        ]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
        if step == "evaluate":
            for phase in cold.evaluate_phases:
                lines.append(f"| evaluate: {phase} | {cold.evaluate_phases[phase]:.1f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument(
        "--cold-cache", action="store_true", help="an empty XDG_CACHE_HOME for the runs"
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    parser.add_argument(
        "--tracking-uri", help="a tracking server to run against instead of a throwaway store"
    )
    parser.add_argument("--overrides", default="", help="config overrides for both runs")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    run = invocation(
        folder, args.model, args.compute, args.cold_cache, args.tracking_uri, args.overrides
    )
    if args.dry_run:
        print(describe(run))
        folder.rmdir()
        return
    print(f"{describe(run)}\n", flush=True)
    timings = measure(run)
    settings = vars(args) | {"tracking_uri": redacted(args.tracking_uri or "a throwaway store")}
    report = provenance(settings) | {
        "command": run.command,
        "warm_over_cold": timings[1].wall_s / timings[0].wall_s,
        "runs": [asdict(t) for t in timings],
    }
    metrics = {f"{t.name}_wall_s": t.wall_s for t in timings}
    metrics["warm_over_cold"] = report["warm_over_cold"]
    cold = timings[0]
    metrics |= {f"cold.seconds.{step}": s for step, s in cold.step_seconds.items()}
    metrics |= {f"cold.evaluate.seconds.{p}": s for p, s in cold.evaluate_phases.items()}
    name = "pipeline-cold-cache" if args.cold_cache else "pipeline"
    name += "-server" if args.tracking_uri else ""
    write_report(name, report, markdown(timings), args.out, tracking_uri(args.out), metrics)
    shutil.rmtree(folder)


if __name__ == "__main__":
    main()
