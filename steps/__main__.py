"""The launcher behind every MLproject entry point:

    python -m steps <entry point> --model M --compute C --overrides "key=value key2=value2"
    python -m steps <entry point> ... --print-config   (the resolved config; runs nothing)

    python -m steps reproduce RUN_ID     (prints the command that reruns a recorded run)

    python -m steps render_job ENTRY_POINT --compute k8s-cpu
                                         (prints the Kubernetes Job MLflow would submit)

    python -m steps serve [--model-uri URI] [--host H] [--port P]
                                         (an OpenAI-compatible server of the champion)

    python -m steps add-model SOURCE [--revision R]
                                         (a Hub repo or local folder as conf/model/<name>.yaml)

It turns MLproject parameters into Hydra overrides (`mlflow run` shell-quotes `overrides` into
one argument, so it is split here with shlex), composes and validates the config once, and calls
the step's `main(cfg)`. Pipeline errors end as one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys

import mlflow
from mlflow.exceptions import MlflowException

from steps.backends.kubernetes import unquote_args
from steps.config.compose import compose_config, resolved_config_yaml
from steps.config.plan import ENTRY_POINTS
from steps.errors import ConfigError, PipelineError
from steps.tracking.server import explained

log = logging.getLogger("steps")


def hydra_overrides(
    model: str | None,
    compute: str | None,
    overrides: str,
    parameters: dict[str, str | None] | None = None,
) -> list[str]:
    """MLproject parameters as Hydra overrides, then the user's own `overrides`, which therefore
    win (Hydra keeps the last value): `mlflow run` always passes every parameter, with its
    default when the user gave none, and a default must not undo what `overrides` says.
    `parameters` maps a config key (main.rerun) to a parameter's value; empty ones are left out.
    """
    try:
        extra = shlex.split(overrides)
    except ValueError as error:
        raise ConfigError(f"cannot split overrides {overrides!r}: {error}") from None
    chosen = [
        f"{group}={value}" for group, value in (("model", model), ("compute", compute)) if value
    ]
    chosen += [f"{key}={value}" for key, value in (parameters or {}).items() if value]
    return chosen + extra


def main(argv: list[str] | None = None) -> int:
    argv = unquote_args(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["reproduce"]:
        from steps.reproduce import cli

        return cli(argv[1:])
    if argv[:1] == ["render_job"]:
        from steps.backends.kubernetes import cli

        return cli(argv[1:])
    if argv[:1] == ["serve"]:
        from steps.serve import cli

        return cli(argv[1:])
    if argv[:1] == ["add-model"]:
        from steps.add_model import cli

        return cli(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m steps", description=__doc__.split("\n\n")[0])
    parser.add_argument("entry_point", choices=ENTRY_POINTS)
    parser.add_argument(
        "--model", help="model variant (conf/model/); default from conf/config.yaml"
    )
    parser.add_argument("--compute", help="compute target (conf/compute/)")
    parser.add_argument("--overrides", default="", help='more Hydra overrides: "a.b=1 c=2"')
    parser.add_argument("--steps", help="main only: comma-separated steps to run (main.steps)")
    parser.add_argument("--rerun", help="main only: true reruns steps that could be reused")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config the step would run with, and stop",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        main_parameters = {
            "main.steps": f"[{args.steps}]" if args.steps else None,
            "main.rerun": args.rerun,
        }
        cfg = compose_config(
            hydra_overrides(args.model, args.compute, args.overrides, main_parameters)
        )
        if args.print_config:
            print(resolved_config_yaml(cfg), end="")
            return 0
        step = importlib.import_module(f"steps.{args.entry_point}")
        if args.entry_point == "main":
            # main hands the user's overrides on to its child runs (model and compute travel
            # as their own parameters).
            step.main(cfg, hydra_overrides(None, None, args.overrides))
        else:
            step.main(cfg)
    except PipelineError as error:
        print(f"error: {args.entry_point}: {error}", file=sys.stderr)
        return error.exit_code
    except MlflowException as error:
        # What no step turned into a line itself: a refusal or a lost server still ends as one.
        failure = explained(error, mlflow.get_tracking_uri())
        if failure is error:
            raise
        print(f"error: {args.entry_point}: {failure}", file=sys.stderr)
        return failure.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
