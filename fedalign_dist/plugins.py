"""Code from outside the package: modules named in the config's `imports` (or `--import` on
the command line) and installed packages' entry points in the group `fedalign_dist.plugins`,
imported before a config is validated, so what they register (strategies, data sources and
task types, with their config sections) is known to validation, to every rank and to `config show`."""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "fedalign_dist.plugins"
_entry_points_loaded = False


def load_plugins(modules: list[str]) -> None:
    from fedalign_dist.config_sections import ConfigError
    global _entry_points_loaded
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(f"imports must be a list of module names, got {modules!r}")
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for point in entry_points(group=ENTRY_POINT_GROUP):
            try:
                point.load()
            except Exception as err:  # a broken plugin must say which one it is
                raise ConfigError(f"plugin entry point '{point.name}' ({point.value}) failed to load: "
                                  f"{type(err).__name__}: {err}") from err
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            raise ConfigError(f"imports: cannot import '{name}' ({err}): install it, or put its folder on "
                              f"PYTHONPATH (every rank imports it)") from None
