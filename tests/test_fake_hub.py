"""Drive the real huggingface_hub client against FakeHub, so download code can be tested offline."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
from fake_hub import FakeHub, folder_files
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

OLD = "a" * 40
NEW = "b" * 40
GATED = "c" * 40
BIG = bytes(range(256)) * 6000  # 1.5 MB: above the LFS threshold, several small chunks
REPOS = {
    "org/model": {
        OLD: {"config.json": b'{"v": 1}', "weights/model.bin": BIG[::-1]},
        NEW: {"config.json": b'{"v": 2}', "weights/model.bin": BIG, "README.md": b"# card"},
    },
    "org/gated": {GATED: {"config.json": b'{"gated": true}'}},
}
REFS = {"org/model": {"main": NEW}, "org/gated": {"main": GATED}}


@pytest.fixture
def hub(loopback_hub) -> FakeHub:
    """A fresh server per test, with the client pointed at it and its cache under tmp_path."""
    return loopback_hub(REPOS, REFS, gated={"org/gated"}, valid_tokens={"hf_secret"})


def test_snapshot_at_pinned_commit_skips_revision_lookup(hub: FakeHub, tmp_path: Path) -> None:
    folder = snapshot_download("org/model", revision=OLD)
    assert Path(folder) == tmp_path / "hf-home" / "hub" / "models--org--model" / "snapshots" / OLD
    assert folder_files(Path(folder)) == REPOS["org/model"][OLD]
    calls = [(r.method, r.path) for r in hub.requests]
    assert ("GET", f"/api/models/org/model/tree/{OLD}") in calls
    assert not any("/revision/" in path for _, path in calls)


def test_snapshot_at_branch_resolves_to_commit(hub: FakeHub, tmp_path: Path) -> None:
    folder = snapshot_download("org/model", revision="main")
    assert Path(folder).name == NEW
    assert folder_files(Path(folder)) == REPOS["org/model"][NEW]
    refs = tmp_path / "hf-home" / "hub" / "models--org--model" / "refs" / "main"
    assert refs.read_text() == NEW
    assert hub.requests[0].path == "/api/models/org/model/revision/main"


def test_allow_patterns_limit_downloads(hub: FakeHub) -> None:
    folder = snapshot_download("org/model", allow_patterns=["*.json"])
    assert folder_files(Path(folder)) == {"config.json": b'{"v": 2}'}
    assert [r.path for r in hub.requests if "/resolve/" in r.path] == [
        f"/org/model/resolve/{NEW}/config.json"
    ] * 2  # HEAD for metadata, then GET


def test_dropped_connection_resumes_with_range(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Bytes buffered in an unfinished read chunk are lost on a drop: with the default 10 MiB
    # chunk the client restarts from 0 without Range, so shrink the chunk to see a real resume.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    hub.drop_connection_once("org/model", "weights/model.bin", after_bytes=300_000)
    path = hf_hub_download("org/model", "weights/model.bin", revision=NEW)
    assert Path(path).read_bytes() == BIG
    gets = [r for r in hub.requests if r.method == "GET"]
    assert [r.headers.get("range") for r in gets] == [None, "bytes=262144-"]
    assert not list((tmp_path / "hf-home" / "hub").rglob("*.incomplete"))


def test_gated_repo_needs_valid_token(hub: FakeHub) -> None:
    with pytest.raises(GatedRepoError):
        snapshot_download("org/gated")
    folder = snapshot_download("org/gated", token="hf_secret")
    assert folder_files(Path(folder)) == REPOS["org/gated"][GATED]
    assert hub.requests[-1].headers["authorization"] == "Bearer hf_secret"


def test_unknown_token_rejected_like_the_hub(hub: FakeHub) -> None:
    with pytest.raises(HfHubHTTPError) as info:
        HfApi().model_info("org/model", token="hf_wrong")
    assert info.value.response.status_code == 401


@pytest.mark.parametrize(
    ("repo", "revision", "error"),
    [
        ("org/missing", None, RepositoryNotFoundError),
        ("org/model", "no-such-branch", RevisionNotFoundError),
        ("org/model", "f" * 40, RevisionNotFoundError),
    ],
)
def test_a_missing_repo_branch_or_commit_raises_the_clients_own_error(
    hub: FakeHub, repo: str, revision: str | None, error: type
) -> None:
    with pytest.raises(error):
        snapshot_download(repo, revision=revision)


def test_a_missing_file_raises_remote_entry_not_found(hub: FakeHub) -> None:
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("org/model", "nope.txt")


def test_model_info_gives_file_sizes_and_lfs_only_for_large_files(hub: FakeHub) -> None:
    info = huggingface_hub.model_info("org/model", revision="main", files_metadata=True)
    assert info.sha == NEW
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert siblings["config.json"].size == 8 and siblings["config.json"].lfs is None
    lfs = siblings["weights/model.bin"].lfs
    assert lfs is not None and lfs.size == len(BIG)
    assert hub.requests[-1].query == {"blobs": ["true"]}
