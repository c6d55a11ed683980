"""Snapshots from the Hugging Face Hub, through the real `huggingface_hub` client.

Files stay in huggingface_hub's own cache (HF_HOME / HF_HUB_CACHE, shared with every other HF
tool): the client already stores them content-addressed, locks per blob, resumes partial
downloads and renames into place. This module adds what it does not do: re-verify the cached
bytes against their digests, repair what does not match, and turn client errors into messages
that say what to do. The token is read by the client from HF_TOKEN / the HF login; it never
passes through here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from steps.errors import FetchError
from steps.store.manifest import FileEntry, hash_tree, sha256_file

log = logging.getLogger(__name__)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubSnapshot:
    path: Path  # the snapshot folder in the HF cache: .../snapshots/<commit>
    commit: str
    files: list[FileEntry]
    bytes_fetched: int
    repaired: list[str]


def fetch_hub_snapshot(
    repo_id: str, revision: str, allow_patterns: list[str] | None = None
) -> HubSnapshot:
    """Download (or find in the cache) a repo at a revision and verify every file."""
    repo_cache = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    blobs_before = _blob_sizes(repo_cache)
    path = download(repo_id, revision, allow_patterns)
    damaged = _remove_damaged_blobs(path)
    if damaged:
        log.warning("re-downloading %d damaged cached file(s): %s", len(damaged), sorted(damaged))
        for blob in damaged.values():
            blobs_before.pop(blob, None)
        path = download(repo_id, revision, allow_patterns)
        still_bad = _remove_damaged_blobs(path)
        if still_bad:
            raise FetchError(
                f"{repo_id}@{revision}: {sorted(still_bad)} still do not match their digests "
                "after a fresh download; the Hub's copy or the disk is faulty"
            )
    fetched = sum(
        size for blob, size in _blob_sizes(repo_cache).items() if blob not in blobs_before
    )
    return HubSnapshot(
        path=path,
        commit=path.name,
        files=hash_tree(path, f"hashing {repo_id}"),
        bytes_fetched=fetched,
        repaired=sorted(damaged),
    )


def onnx_export_folders(repo_id: str, commit: str) -> list[str]:
    """The folders of a repo at a commit that hold an onnxruntime-genai model (a
    genai_config.json), for an error message that says what there is instead."""
    from huggingface_hub import HfApi

    try:
        tree = HfApi().list_repo_tree(repo_id, revision=commit, recursive=True)
        paths = [entry.path for entry in tree]
    except HfHubHTTPError:
        return []
    return sorted(p.rpartition("/")[0] for p in paths if p.endswith("/genai_config.json"))


def download(repo_id: str, revision: str, allow_patterns: list[str] | None) -> Path:
    """The files of a repo at a revision that match the patterns (None: all), in
    huggingface_hub's cache; the client's errors as one FetchError line saying what to do."""
    where = f"{repo_id} at revision {revision} from {constants.ENDPOINT}"
    log.info("fetching %s", where)
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns or None)
        )
    except GatedRepoError:
        raise FetchError(
            f"{repo_id} is gated: accept its terms on {constants.ENDPOINT}/{repo_id} and set "
            "HF_TOKEN to a token of an account that has access"
        ) from None
    except RepositoryNotFoundError as error:
        hint = (
            "the token in HF_TOKEN was rejected; create a new one"
            if _status(error) == 401 and _token_given()
            else "check model.source.repo_id; if the repo is private, set HF_TOKEN"
        )
        raise FetchError(f"{repo_id} was not found on {constants.ENDPOINT}: {hint}") from None
    except RevisionNotFoundError:
        raise FetchError(
            f"{repo_id} has no revision {revision!r}: check model.source.revision "
            "(a branch, tag or 40-hex commit)"
        ) from None
    except HfHubHTTPError as error:
        if _status(error) == 401:
            raise FetchError(
                f"{constants.ENDPOINT} rejected the token in HF_TOKEN while fetching {repo_id}: "
                "create a new token or unset HF_TOKEN for public repos"
            ) from None
        raise FetchError(f"fetching {where} failed: {_first_line(error)}") from None
    except LocalEntryNotFoundError:
        raise FetchError(
            f"cannot reach {constants.ENDPOINT} to fetch {repo_id} and it is not in the cache "
            f"({constants.HF_HUB_CACHE}); check the network, HF_ENDPOINT or HF_HUB_OFFLINE"
        ) from None


def _remove_damaged_blobs(snapshot: Path) -> dict[str, str]:
    """Check each cached file against the digest its blob is named by (sha256 for LFS files,
    git's blob sha1 for the rest); delete the blob and link of any that do not match.

    Returns {path in the snapshot: blob path} of what was deleted."""
    damaged = {}
    for link in sorted(snapshot.rglob("*")):
        if not link.is_symlink() and not link.is_file():
            continue
        blob = link.resolve()
        if blob.is_file() and _matches_name(blob):
            continue
        damaged[link.relative_to(snapshot).as_posix()] = str(blob)
        for path in (blob, link):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return damaged


def _matches_name(blob: Path) -> bool:
    name = blob.name
    if _SHA256.fullmatch(name):
        return sha256_file(blob) == name
    if _GIT_SHA1.fullmatch(name):
        header = f"blob {blob.stat().st_size}\0".encode()
        return hashlib.sha1(header + blob.read_bytes()).hexdigest() == name
    return True  # not content-named (e.g. a local_dir copy): nothing to compare against


def _blob_sizes(repo_cache: Path) -> dict[str, int]:
    blobs = repo_cache / "blobs"
    if not blobs.is_dir():
        return {}
    return {str(path): path.stat().st_size for path in blobs.iterdir() if path.is_file()}


def _status(error: HfHubHTTPError) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _token_given() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
