"""Serve a chat model as an OpenAI-compatible endpoint:

    python -m steps serve [--model-uri URI] [--host 127.0.0.1] [--port 8000]
        [--poll-interval 30] [--model M] [--compute C]
        [--api-key KEY ...] [--api-key-file PATH ...] [--grace-period 25]

Without --model-uri it serves `models:/<variant>-<runtime>-<hardware>@champion`, the name the
register step uses, for the default (or given) model variant and compute target: of the two
runtimes' registered models, the one whose champion was registered last. The registry is the
one the steps use (MLFLOW_TRACKING_URI, else the project's mlflow.db). Any `models:/`, `runs:/`
or local model URI of either runtime works too. A `models:/name@alias` URI is followed: every
--poll-interval seconds the alias is read again and a new version is switched in without
dropping a request (steps/serving/follow.py). Routes: steps/serving/openai_api.py.

With API keys (--api-key, --api-key-file, or LLM_TO_MLFLOW_API_KEYS: steps/serving/api_keys.py)
every route but /health needs `Authorization: Bearer <key>`. On SIGTERM (or Ctrl-C) the server
drains: /health and new requests answer 503, the listening socket closes, the answers and
streams in flight finish within --grace-period seconds (then they are cut), and it exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import mlflow

from steps.config.compose import compose_config
from steps.config.schema import Runtime
from steps.errors import ConfigError, PipelineError
from steps.serving.api_keys import ApiKeys, load_keys
from steps.serving.follow import (
    AliasFollower,
    Holder,
    ServedVersion,
    download_and_load,
    resolve_alias,
)
from steps.serving.openai_api import create_app
from steps.tracking.registry import registered_model_name, version_by_alias
from steps.tracking.runs import default_tracking_uri
from steps.tracking.server import check_tracking_server, redacted

log = logging.getLogger("steps.serve")
ALIAS = "champion"


def champion_uri(model: str | None, compute: str | None) -> str:
    """`models:/<name>@champion` of the runtime whose champion was registered last."""
    chosen = (("model", model), ("compute", compute))
    cfg = compose_config([f"{group}={value}" for group, value in chosen if value])
    names = [
        registered_model_name(cfg.model.name, runtime, cfg.compute.target) for runtime in Runtime
    ]
    champions = [(v, name) for name in names if (v := version_by_alias(name, ALIAS)) is not None]
    if not champions:
        raise PipelineError(
            f"no registered model has a {ALIAS!r} alias ({' or '.join(names)} at "
            f"{redacted(mlflow.get_tracking_uri())}); run the pipeline first (make run), or pass "
            "--model-uri"
        )
    _, name = max(champions, key=lambda found: int(found[0].creation_timestamp))
    return f"models:/{name}@{ALIAS}"


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m steps serve", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model-uri", help="models:/, runs:/ or local model URI "
                        "(default: the default variant's champion)")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--poll-interval", type=float, default=30.0,
                        help="seconds between reads of a followed alias")  # fmt: skip
    parser.add_argument("--model", help="model variant for the default URI (conf/model/)")
    parser.add_argument("--compute", help="compute target for the default URI (conf/compute/)")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help="a key clients must send as a Bearer token (repeatable; prefer "
                        "--api-key-file or LLM_TO_MLFLOW_API_KEYS: a command line is visible "
                        "to other users of the machine)")  # fmt: skip
    parser.add_argument(
        "--api-key-file",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="a file of keys, one per line (repeatable)",
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=25.0,
        help="seconds the requests in flight get to finish after SIGTERM",
    )
    args = parser.parse_args(argv)
    # No usage telemetry from onnxruntime-genai and no session file in the temp folder, unless
    # the user asked for them (docs/serving.md).
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.poll_interval <= 0:
            raise ConfigError(f"--poll-interval must be positive, got {args.poll_interval}")
        if args.grace_period < 0:
            raise ConfigError(f"--grace-period must be 0 or more, got {args.grace_period}")
        keys = ApiKeys(load_keys(args.api_key, args.api_key_file))
        uri = default_tracking_uri()
        check_tracking_server(uri)
        mlflow.set_tracking_uri(uri)
        served = resolve_alias(args.model_uri or champion_uri(args.model, args.compute))
        serve(served, args.host, args.port, args.poll_interval, keys, args.grace_period)
    except PipelineError as error:
        print(f"error: serve: {error}", file=sys.stderr)
        return error.exit_code
    return 0


def serve(
    served: ServedVersion, host: str, port: int, poll_interval: float, keys: ApiKeys,
    grace_period: float,
) -> None:  # fmt: skip
    """Answer on host:port at once (/health says 503 until the model is loaded); load the model
    in the background; follow the alias, if there is one; drain on SIGTERM."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # uvicorn's own handler would raise the signal again once drained, ending the
            # process by SIGTERM (exit -15) instead of 0; a second Ctrl-C still cuts it short.
            api.drain()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    holder = Holder()
    app, api = create_app(holder, keys)
    with tempfile.TemporaryDirectory(prefix="steps-serve-") as scratch:
        server = DrainingServer(
            uvicorn.Config(
                app, host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=grace_period,
            )
        )  # fmt: skip
        failed: list[BaseException] = []

        def load_first() -> None:
            try:
                holder.switch(download_and_load(served, Path(scratch)))
            except Exception as error:
                failed.append(error)
                server.should_exit = True
                return
            log.info("serving %s as %r on http://%s:%d/v1%s", served.pinned_uri, served.model_id,
                     host, port, " (API keys required)" if keys.required else "")  # fmt: skip
            if served.alias:
                follower.start()

        follower = AliasFollower(
            holder, served, poll_interval, lambda moved: download_and_load(moved, Path(scratch))
        )
        threading.Thread(target=load_first, name="first-load", daemon=True).start()
        server.run()
        follower.stop()
        holder.close()
    if failed:
        error = failed[0]
        raise PipelineError(f"cannot load {served.pinned_uri}: {error}") from None
