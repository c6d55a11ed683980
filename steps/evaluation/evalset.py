"""The versioned evaluation set: JSONL items with accepted answer patterns, and the check
that scores a reply against them."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from steps.errors import PipelineError


@dataclass(frozen=True)
class EvalItem:
    id: str
    category: str
    question: str
    reference: str
    accept: tuple[str, ...]


@dataclass(frozen=True)
class EvalSet:
    name: str
    path: Path
    sha256: str
    items: tuple[EvalItem, ...]


def load_eval_set(path: Path, max_items: int | None = None) -> EvalSet:
    """Parse and check a JSONL evaluation set; bad lines are reported by line number."""
    if not path.is_file():
        raise PipelineError(f"evaluate.dataset={path} does not exist")
    raw = path.read_bytes()
    items = []
    for number, line in enumerate(raw.decode().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
            item = EvalItem(
                id=str(body["id"]),
                category=str(body.get("category", "")),
                question=str(body["question"]),
                reference=str(body["reference"]),
                accept=tuple(body["accept"]),
            )
            for pattern in item.accept:
                re.compile(pattern)
        except (json.JSONDecodeError, KeyError, TypeError, re.error) as error:
            raise PipelineError(
                f"{path}:{number}: not an evaluation item ({type(error).__name__}: {error}); "
                "each line needs id, question, reference and accept (a list of regexes)"
            ) from None
        if not item.accept:
            raise PipelineError(f"{path}:{number}: item {item.id} has no accepted patterns")
        items.append(item)
    if not items:
        raise PipelineError(f"evaluate.dataset={path} has no items")
    return EvalSet(
        name=path.stem,
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        items=tuple(items[:max_items] if max_items else items),
    )


def is_correct(reply: str, accept: tuple[str, ...]) -> bool:
    """A reply is right when it matches any accepted pattern (case-insensitive)."""
    return any(re.search(pattern, reply, re.IGNORECASE) for pattern in accept)
