"""Loading a configuration: YAML file, mapping or defaults, dotted overrides, plugins,
then validation against the schema completed from the registries.

Every key is declared in config_sections.py with its type and default; unknown keys are
errors that suggest the closest valid key; values are validated before any process group
starts. This module depends on the registries (strategies, data sources and task types,
privacy checks), never the other way round.
"""
from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

from fedalign_dist.config_sections import Config, ConfigError, ConfigSection, DataConfig, StrategyConfig

__all__ = ["Config", "ConfigError", "ConfigSection", "apply_override", "config_schema", "dump_config",
           "load_config", "read_raw"]


class RegisteredConfig(Config):
    """Config plus the checks that consult the registries: the strategy, data source and task
    type exist, each accepts the config, and privacy settings keep their guarantee."""

    @model_validator(mode="after")
    def _check_registered(self):
        from fedalign_dist.strategies import registered_strategies, strategy_class
        if self.strategy.name not in registered_strategies():
            raise ValueError(_unknown("strategy.name", self.strategy.name, registered_strategies()))
        strategy_class(self.strategy.name).check_config(self)
        from fedalign_dist.data.registry import registered_sources, registered_tasks, source_class
        if self.data.name not in registered_sources():
            raise ValueError(_unknown("data.name", self.data.name, registered_sources()))
        if self.data.task not in registered_tasks():
            raise ValueError(_unknown("data.task", self.data.task, registered_tasks()))
        source_class(self.data.name).check_config(self)
        if self.privacy.enabled:
            from fedalign_dist.privacy.checks import check_privacy_config
            check_privacy_config(self)
        return self


def _unknown(key: str, value: str, valid) -> str:
    close = difflib.get_close_matches(value, list(valid), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown {key} '{value}' (valid: {', '.join(sorted(valid))}){hint}"


_SCHEMAS: dict[tuple, type[Config]] = {}


def config_schema() -> type[Config]:
    """Config with one `strategy.<name>` section per registered strategy and one `data.<name>`
    section per registered data source or task type that declares knobs (built-in or
    imported), so unknown keys, types and documentation cover them too."""
    from fedalign_dist.data.registry import data_sections
    from fedalign_dist.strategies import strategy_sections
    strategies, data = strategy_sections(), data_sections()
    key = tuple((n, id(c)) for n, c in strategies.items()), tuple((n, id(c)) for n, c in data.items())
    if key not in _SCHEMAS:
        strategy = _extend(StrategyConfig, strategies)
        data_section = _extend(DataConfig, data)
        _SCHEMAS[key] = create_model(
            "Config",
            __base__=RegisteredConfig,
            strategy=(strategy, Field(default_factory=strategy)),
            data=(data_section, Field(default_factory=data_section)),
        )
    return _SCHEMAS[key]


def _extend(base: type[BaseModel], sections: dict[str, type[BaseModel]]) -> type[BaseModel]:
    fields = {name: (section, Field(default_factory=section, description=(section.__doc__ or "").strip() or None))
              for name, section in sections.items()}
    return create_model(base.__name__, __base__=base, **fields)


def _check_keys(raw: dict, model_cls: type[BaseModel], prefix: str = "") -> None:
    """Reject keys the schema does not declare, naming the closest valid key."""
    fields = model_cls.model_fields
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            valid = [f"{prefix}{k}" for k in fields]
            close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f" (valid here: {', '.join(valid)})"
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        annotation = fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' is a section; give it as a mapping, not {value!r}")
            _check_keys(value, annotation, dotted + ".")


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' is not of the form key=value (e.g. fed.rounds=3)")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(value, str) and value.lower() in {"inf", "+inf", ".inf"}:
        value = math.inf
    node[parts[-1]] = value


def _resolve_checkpoint(raw: dict) -> None:
    """With model.path, what the model is comes from the checkpoint's config.json: family,
    experts and top-k are filled in (so the saved config.yaml describes the model actually
    loaded), and a contradicting value given by the user is an error naming both."""
    model = raw.get("model") or {}
    if not model.get("path"):
        return
    from fedalign_dist.models.families import FAMILIES
    from fedalign_dist.models.packaged import describe_checkpoint
    try:
        found = describe_checkpoint(str(model["path"]))
    except (OSError, ValueError) as err:
        raise ConfigError(str(err)) from None
    if found["family"] != "llama" and found["family"] not in FAMILIES:
        raise ConfigError(f"model.path '{model['path']}' is a '{found['family']}' model; supported: the MoE "
                          f"families {', '.join(FAMILIES)}, or a dense llama decoder (strategy fedamole and baselines)")
    for key in ("family", "num_experts", "top_k"):
        if found[key] is None:
            continue
        if model.get(key) is not None and model[key] != found[key]:
            raise ConfigError(
                f"model.{key}={model[key]} contradicts the checkpoint at model.path ({found[key]} in "
                f"its config.json): remove model.{key} from the config file and overrides; it is read from the "
                f"checkpoint"
            )
        model[key] = found[key]
    model["preset"] = None
    if (raw.get("data") or {}).get("tokenizer") == "model" and not found["tokenizer"]:
        raise ConfigError(f"data.tokenizer=model but model.path '{model['path']}' holds no tokenizer (tokenizer.json, "
                          f"tokenizer.model or vocab.json): save the tokenizer into the checkpoint folder, or use "
                          f"data.tokenizer=byte|gpt2 if the model was built with one of those")
    raw["model"] = model


def read_raw(path: str | Path) -> dict[str, Any]:
    """The YAML file as a mapping; a syntax error names the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def load_config(source: str | Path | dict | Config | None, overrides: list[str] | None = None,
                world_size: int | None = None) -> Config:
    """A config from a YAML file, a mapping, an existing Config, or the defaults (None); apply
    dotted overrides, import the config's `imports`, validate; raise ConfigError on any problem.
    `world_size`: the ranks it will run on, when known (the launcher, a rank), checked first."""
    if isinstance(source, Config):
        source = source.model_dump()
    raw: dict[str, Any] = (read_raw(source) if isinstance(source, (str, Path)) else
                           copy.deepcopy(source) if source is not None else {})
    for assignment in overrides or []:
        apply_override(raw, assignment)
    from fedalign_dist.plugins import load_plugins
    load_plugins(raw.get("imports") or [])
    schema = config_schema()
    _check_keys(raw, schema)
    _resolve_checkpoint(raw)
    try:
        return schema.model_validate(raw, context={"world_size": world_size})
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            lines.append(f"  {loc or 'config'}: {e['msg']}" + (f" (got {e['input']!r})" if loc else ""))
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
