"""The one place configs are composed: conf/ with Hydra, against the schemas.

Every entry point gets its config from `compose_config`, which composes conf/, checks it against
the dataclass schemas (unknown option, misspelled key, wrong type) and then runs their cross-field
`validate` checks. Any failure is a `ConfigError` whose message names the bad value and the valid
choices, raised before any work starts. `config_digest` is the hash that identifies a resolved
config on every run (step reuse and reproduction compare it).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from steps.config import plan
from steps.config.schema import MainConfig, PipelineConfig
from steps.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def project_path(path: str) -> Path:
    """A file the config names (evaluation set, fidelity text): relative to the repository
    root unless absolute."""
    return Path(path) if Path(path).is_absolute() else CONF_DIR.parent / path


def resolved_config_yaml(cfg: PipelineConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_digest(cfg: PipelineConfig) -> str:
    """sha256 of the resolved config: the `config.sha256` tag of every run."""
    return hashlib.sha256(resolved_config_yaml(cfg).encode()).hexdigest()


def group_options(group: str) -> list[str]:
    """The selectable options of a config group: its YAML files (schemas are not options)."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def compose_raw(overrides: list[str]) -> DictConfig:
    """Compose conf/ with Hydra and the schemas; raises ConfigError on any problem."""
    _check_group_choices(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
        raise ConfigError(_describe(cause)) from None
    finally:
        GlobalHydra.instance().clear()


def to_typed(raw: DictConfig) -> PipelineConfig:
    """Turn a composed config into schema objects, running the cross-field checks."""
    try:
        _reject_unknown_keys(raw, "")
        typed = OmegaConf.to_object(raw)
        if not isinstance(typed, PipelineConfig):
            raise ValueError("conf/config.yaml must start its defaults list with pipeline_schema")
        typed.validate()
        plan.check(typed)
    except (ValueError, OmegaConfBaseException) as error:
        raise ConfigError(_describe(error)) from None
    return typed


def compose_config(overrides: list[str]) -> PipelineConfig:
    """The validated, typed config for these Hydra overrides."""
    return to_typed(compose_raw(overrides))


def child_base_config(cfg: PipelineConfig) -> DictConfig:
    """The config every child of `main` composes before its upstream settings: main's own,
    with the `main` group back at its defaults (children never get main's options). Derived
    from the already validated config instead of a second, slower Hydra compose."""
    base = OmegaConf.structured(cfg)
    base.main = OmegaConf.structured(MainConfig())
    return base


def child_config_digest(base: DictConfig, settings: Mapping[str, str | list[str]]) -> str:
    """The config.sha256 tag the child run will carry, given its upstream settings (updating a
    copy of one composed config is much cheaper than a Hydra compose per step)."""
    node = copy.deepcopy(base)
    for key, value in settings.items():
        OmegaConf.update(node, key, value, merge=False)
    return config_digest(to_typed(node))


def _check_group_choices(overrides: list[str]) -> None:
    """Name the valid choices for a group override before Hydra's longer message does."""
    for override in overrides:
        key, sep, value = override.partition("=")
        group = key.lstrip("+~")
        if not sep or "." in group or not (CONF_DIR / group).is_dir():
            continue
        options = group_options(group)
        if value not in options:
            raise ConfigError(
                f"unknown {group} {value!r}: choose one of {', '.join(options)} "
                f"(e.g. -P {group}={options[0]})"
            )


def _reject_unknown_keys(node: DictConfig, path: str) -> None:
    """Hydra's `+key=value` bypasses struct mode; the schemas still decide which keys exist."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = {f.name for f in dataclasses.fields(schema)}
        for key in node:
            if key not in known:
                raise ConfigError(_unknown_key(f"{path}{key}", schema))
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _reject_unknown_keys(child, f"{path}{key}.")


def _unknown_key(full_key: str, schema: type) -> str:
    valid = ", ".join(f.name for f in dataclasses.fields(schema))
    return f"unknown config key {full_key!r}: valid keys there are {valid}"


def _describe(error: Exception) -> str:
    """One line naming the bad key or value; OmegaConf's own text spans several."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    full_key = getattr(error, "full_key", None)
    schema = getattr(error, "object_type", None)
    if isinstance(error, ConfigAttributeError | ConfigKeyError) and dataclasses.is_dataclass(
        schema
    ):
        return _unknown_key(full_key or first, schema)
    if full_key:
        return f"invalid config value for {full_key}: {first}"
    return f"invalid config: {first}"
