"""The model a server answers with, and how it follows a registry alias.

`Holder` keeps the version being served. A request `lease()`s it for as long as it runs, so a
request finishes on the version it started on. `AliasFollower` polls `models:/<name>@<alias>`;
when the alias moves it downloads and loads the new version beside the old one, switches the
holder in one assignment (new requests get the new version from then on), and frees the old
version when its last request ends: no request fails or waits during a switch.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from steps.errors import PipelineError
from steps.serving.served_models import ServedModel, load_served

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedVersion:
    """The model version a server answers with: the model URI as given, and, for a registry
    alias, where it points now."""

    uri: str
    registered_name: str | None = None
    alias: str | None = None
    version: str | None = None

    @property
    def model_id(self) -> str:
        """The name clients send as `model`."""
        return self.registered_name or self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def pinned_uri(self) -> str:
        """The URI of exactly this version (what is downloaded)."""
        if self.registered_name and self.version:
            return f"models:/{self.registered_name}/{self.version}"
        return self.uri


@dataclass
class Loaded:
    """One loaded version and the requests that still use it."""

    served: ServedVersion
    model: ServedModel
    folder: Path  # the downloaded copy, removed with the model
    loaded_at: float = field(default_factory=time.time)
    _leases: int = 0
    _retired: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self) -> None:
        with self._lock:
            self._leases += 1

    def release(self) -> None:
        with self._lock:
            self._leases -= 1
            free = self._retired and self._leases == 0
        if free:
            self._free()

    def retire(self) -> None:
        """No new request gets this version; free it once its last request ends."""
        with self._lock:
            self._retired = True
            free = self._leases == 0
        if free:
            self._free()

    def _free(self) -> None:
        log.info("freeing %s (no request uses it any more)", self.served.pinned_uri)
        self.model.close()
        self.model = None  # type: ignore[assignment]
        gc.collect()
        shutil.rmtree(self.folder, ignore_errors=True)


def download_and_load(served: ServedVersion, scratch: Path) -> Loaded:
    """Copy the model's files into a folder of its own under `scratch` (removed when the model
    is freed; MLflow's own loader would leave its temp copy behind) and load it."""
    import mlflow.artifacts

    scratch.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="model-", dir=scratch))
    started = time.monotonic()
    try:
        local = mlflow.artifacts.download_artifacts(served.pinned_uri, dst_path=str(folder))
        model = load_served(Path(local))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    log.info(
        "loaded %s (%s) in %.1f s", served.pinned_uri, model.runtime, time.monotonic() - started
    )
    return Loaded(served, model, folder)


class Holder:
    """The version being served; None until the first one is loaded."""

    def __init__(self) -> None:
        self._current: Loaded | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> Loaded | None:
        return self._current

    def lease(self) -> Loaded | None:
        """The current version, held until `release()`d (None before the first load)."""
        with self._lock:
            loaded = self._current
            if loaded is not None:
                loaded.acquire()
            return loaded

    def switch(self, new: Loaded) -> None:
        """Serve `new` from now on; retire the version it replaces."""
        with self._lock:
            old, self._current = self._current, new
        log.info("now serving %s", new.served.pinned_uri)
        if old is not None:
            old.retire()

    def close(self) -> None:
        """Serve nothing any more; retire the current version."""
        with self._lock:
            old, self._current = self._current, None
        if old is not None:
            old.retire()


def resolve_alias(uri: str) -> ServedVersion:
    """A `models:/name@alias` URI with the version the alias points at now; any other URI as
    it is (it does not move)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not (uri.startswith("models:/") and "@" in uri):
        return ServedVersion(uri)
    name, alias = uri.removeprefix("models:/").rsplit("@", 1)
    try:
        version = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as error:
        raise PipelineError(
            f"cannot resolve {uri}: {error.message.splitlines()[0]}. Register a model first "
            "(make run), or pass --model-uri"
        ) from None
    return ServedVersion(uri, name, alias, str(version.version))


class AliasFollower:
    """Polls the alias every `interval` seconds in a daemon thread and switches the holder to
    the version it points at. A registry that cannot be reached, or a version that fails to
    load, is logged and the current version stays."""

    def __init__(
        self,
        holder: Holder,
        followed: ServedVersion,
        interval: float,
        load: Callable[[ServedVersion], Loaded],
    ):
        self._holder, self._followed = holder, followed
        self._interval, self._load = interval, load
        self._stop = threading.Event()
        self._failed_version: str | None = None

    def start(self) -> None:
        threading.Thread(target=self._run, name="alias-follower", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.poll()

    def poll(self) -> None:
        """Read the alias once; if it moved, load the version it points at and switch to it."""
        try:
            now = resolve_alias(self._followed.uri)
        except Exception as error:
            log.warning("cannot read %s (%s); still serving the current version",
                        self._followed.uri, error)  # fmt: skip
            return
        current = self._holder.current
        if now.version in (self._failed_version, current and current.served.version):
            return
        log.info("%s moved to version %s; loading it beside the current one", now.uri, now.version)
        try:
            loaded = self._load(now)
        except Exception as error:
            self._failed_version = now.version
            log.error("cannot load %s (%s); still serving the current version",
                      now.pinned_uri, error)  # fmt: skip
            return
        self._holder.switch(loaded)
