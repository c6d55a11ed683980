"""Add a model variant from the Hub or a local folder:

    python -m steps add-model SOURCE [--revision R] [--name NAME] [--force]

SOURCE is a Hub repo id (`Qwen/Qwen2.5-0.5B-Instruct`; `--revision` a branch, tag or commit,
pinned to its commit) or a local HF-format folder. Only the small files are read (config.json,
the tokenizer config, the chat template, the model card), through huggingface_hub's cache. The
model must be one both runtimes build: its architecture in the installed onnxruntime-genai
builder and in transformers without remote code, and a chat template. What passes becomes
`conf/model/<name>.yaml` in the form of the existing variants (context length from the config,
licence from the model card), and the `mlflow run` command that uses it is printed. What does
not pass stops with one line that says why and what to do, and nothing is written; a model the
parity matrix found the ONNX builds get wrong (steps/onnx/known_differences.py) is refused
where no build can be made, and written with a warning (printed, and in the YAML's header)
where one can.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from steps.config.compose import CONF_DIR, compose_config
from steps.errors import ConfigError, PipelineError
from steps.onnx.build import supported_architectures
from steps.onnx.known_differences import Affects, known_differences
from steps.sources.hub import download
from steps.store.snapshot_store import atomic_write_text

# What add-model reads of a repo: never weights.
SMALL_FILES = [
    "config.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "README.md",
]
# What the variant's fetch downloads (as the Phi-3 variants do).
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "LICENSE"]
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


@dataclass(frozen=True)
class ModelFiles:
    """A model's small files as read: from the Hub at a commit, or from a folder."""

    folder: Path
    repo_id: str | None  # None: a local folder
    commit: str | None


@dataclass(frozen=True)
class NewVariant:
    name: str
    path: Path  # conf/model/<name>.yaml
    architecture: str
    context_length: int
    license: str
    tied_embeddings: bool
    yaml: str
    warnings: tuple[str, ...]  # the known ONNX differences that apply to it


def read_files(source: str, revision: str | None) -> ModelFiles:
    """The small files of a local folder (SOURCE is a directory) or of a Hub repo at a commit."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        if revision:
            raise ConfigError(f"--revision is for Hub repos; {source} is a local folder")
        return ModelFiles(folder.resolve(), None, None)
    if source.count("/") != 1 or source.startswith(("/", ".")):
        raise ConfigError(
            f"{source!r} is neither a folder nor a Hub repo id: give an HF-format folder or "
            "owner/name (e.g. Qwen/Qwen2.5-0.5B-Instruct)"
        )
    snapshot = download(source, revision or "main", SMALL_FILES)
    return ModelFiles(snapshot, source, snapshot.name)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def causal_lm_architectures() -> frozenset[str]:
    """The text-generation model classes the installed transformers ships."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    return frozenset(n for v in names for n in (v if isinstance(v, list | tuple) else [v]))


def check_architecture(config: dict[str, Any], where: str) -> str:
    """The architecture, where both runtimes build it as a causal language model; else
    ConfigError naming the nearest ones they do."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if "auto_map" in config:
        raise ConfigError(
            f"{where} needs trust_remote_code (its config.json has auto_map): the pipeline "
            "runs only architectures transformers ships; pick a variant of the model that "
            "transformers supports natively"
        )
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ConfigError(
            f"{where}: transformers {transformers.__version__} does not know model_type "
            f"{model_type!r}; upgrade transformers or pick another model"
        )
    architecture = (config.get("architectures") or [""])[0]
    in_builder, causal = supported_architectures(), causal_lm_architectures()
    both = sorted(in_builder & causal)
    if architecture in both:
        return architecture
    nearest = difflib.get_close_matches(architecture, both, n=3, cutoff=0.5) or both[:3]
    if architecture in causal:
        only = "transformers only"
    elif architecture in in_builder:
        only = "the ONNX builder only (transformers has no causal LM class of that name)"
    else:
        only = "neither runtime"
    raise ConfigError(
        f"{where}: {architecture or 'no architecture'} is supported by {only}; the pipeline "
        f"needs both (nearest that both build: {', '.join(nearest)})"
    )


def has_chat_template(files: ModelFiles) -> bool:
    tokenizer = _json(files.folder / "tokenizer_config.json")
    return bool(
        tokenizer.get("chat_template")
        or (files.folder / "chat_template.jinja").is_file()
        or _json(files.folder / "chat_template.json").get("chat_template")
    )


def card_license(files: ModelFiles) -> str:
    from huggingface_hub import ModelCard

    card = files.folder / "README.md"
    if not card.is_file():
        return "unknown"
    license_ = ModelCard.load(card).data.get("license")
    return str(license_) if license_ else "unknown"


def variant_name(files: ModelFiles, name: str | None) -> str:
    chosen = name or (files.repo_id or files.folder.name).rsplit("/", 1)[-1].lower()
    if not _NAME.fullmatch(chosen):
        raise ConfigError(
            f"{chosen!r} is not a usable variant name: lowercase letters, digits, '.', '-' and "
            "'_' (pass --name)"
        )
    return chosen


def new_variant(files: ModelFiles, name: str | None, force: bool) -> NewVariant:
    """Check the model and render its conf/model YAML (plain values: nothing written)."""
    where = files.repo_id or str(files.folder)
    config = _json(files.folder / "config.json")
    if not config:
        raise ConfigError(f"{where} has no readable config.json: it is not an HF-format model")
    architecture = check_architecture(config, where)
    known = known_differences(config)
    if blocked := [k.says for k in known if k.affects is Affects.NO_BUILD]:
        raise ConfigError(
            f"{where}: the installed onnxruntime-genai builder cannot build {architecture} "
            f"({'; '.join(blocked)}): pick another model, or a builder version that fixes it "
            "(docs/models.md, the parity matrix)"
        )
    warnings = tuple(f"{k.affects.value}: {k.says}" for k in known)
    if not has_chat_template(files):
        raise ConfigError(
            f"{where} has no chat template (tokenizer_config.json, chat_template.jinja or "
            "chat_template.json): the pipeline serves chat models; pick the model's instruct "
            "variant"
        )
    context = config.get("max_position_embeddings") or config.get("n_positions")
    if not isinstance(context, int) or context <= 0:
        raise ConfigError(f"{where}: config.json gives no max_position_embeddings")
    chosen = variant_name(files, name)
    path = CONF_DIR / "model" / f"{chosen}.yaml"
    if path.exists() and not force:
        raise ConfigError(f"{path.relative_to(CONF_DIR.parent)} exists: pass --force to replace it")
    license_ = card_license(files)
    tied = bool(config.get("tie_word_embeddings", True))
    if files.repo_id:
        source = {
            "kind": "hub",
            "repo_id": files.repo_id,
            "revision": files.commit,
            "allow_patterns": WEIGHT_PATTERNS,
        }
        origin = f"{files.repo_id} at commit {files.commit}"
    else:
        source = {"kind": "local", "path": str(files.folder)}
        origin = f"the folder {files.folder}"
    body = {
        "defaults": ["model_schema", "_self_"],
        "name": chosen,
        "display_name": (files.repo_id or files.folder.name).rsplit("/", 1)[-1],
        "license": license_,
        "source": source,
        "context_length": context,
    }
    header = (
        f"# {origin} ({license_} licence), added with `python -m steps add-model`.\n"
        f"# {architecture}, {config.get('num_hidden_layers', '?')} layers, context {context}, "
        f"{'tied' if tied else 'untied'} input and output embeddings.\n"
    ) + "".join(f"# Known ONNX difference: {warning}.\n" for warning in warnings)
    text = header + yaml.safe_dump(body, sort_keys=False)
    return NewVariant(chosen, path, architecture, context, license_, tied, text, warnings)


def write(variant: NewVariant) -> None:
    """Write the YAML whole and check it composes; on failure, put back what was there."""
    replaced = variant.path.read_text() if variant.path.exists() else None
    atomic_write_text(variant.path, variant.yaml)
    try:
        compose_config([f"model={variant.name}"])
    except ConfigError:
        if replaced is None:
            variant.path.unlink(missing_ok=True)
        else:
            atomic_write_text(variant.path, replaced)
        raise


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m steps add-model", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("source", help="a Hub repo id (owner/name) or a local HF-format folder")
    parser.add_argument("--revision", help="Hub branch, tag or commit (default: main, pinned)")
    parser.add_argument("--name", help="the variant's name (default: the repo's, lowercased)")
    parser.add_argument("--force", action="store_true", help="replace an existing variant")
    args = parser.parse_args(argv)
    try:
        variant = new_variant(read_files(args.source, args.revision), args.name, args.force)
        write(variant)
    except PipelineError as error:
        print(f"error: add-model: {error}", file=sys.stderr)
        return error.exit_code
    for warning in variant.warnings:
        print(f"warning: add-model: {variant.architecture}: {warning}", file=sys.stderr)
    print(
        f"wrote {variant.path.relative_to(CONF_DIR.parent)}: {variant.architecture}, context "
        f"{variant.context_length}, licence {variant.license}. Run the pipeline on it with:\n"
        f"  mlflow run . --env-manager local -P model={variant.name}"
    )
    return 0
