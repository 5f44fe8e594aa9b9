"""Extension without editing the package: a strategy (with its config section) from a module
named in `imports` / --import, or from an installed package's entry point; and the round loop
names no strategy or model family."""
import re
from pathlib import Path

import pytest

from fedalign_dist import plugins
from fedalign_dist.config import ConfigError, load_config

PLUGINS = Path(__file__).resolve().parents[1] / "data" / "plugins"
REPO = Path(__file__).resolve().parents[2]


def test_imported_strategy_brings_its_validated_config_section(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    with pytest.raises(ConfigError, match="unknown strategy.name 'scaled_fedavg'|scaled_fedavg"):
        load_config(None, ["strategy.name=scaled_fedavg_missing"])
    cfg = load_config(None, ["imports=[scaled_fedavg]", "strategy.name=scaled_fedavg",
                             "strategy.scaled_fedavg.server_lr=0.5"])
    assert cfg.strategy.scaled_fedavg.server_lr == 0.5 and cfg.imports == ["scaled_fedavg"]
    with pytest.raises(ConfigError, match="did you mean 'strategy.scaled_fedavg.server_lr'"):
        load_config(None, ["imports=[scaled_fedavg]", "strategy.scaled_fedavg.server_rl=0.5"])
    with pytest.raises(ConfigError, match="strategy.scaled_fedavg.server_lr"):
        load_config(None, ["imports=[scaled_fedavg]", "strategy.scaled_fedavg.server_lr=-1"])
    with pytest.raises(ConfigError, match="cannot import 'no_such_plugin'.*PYTHONPATH"):
        load_config(None, ["imports=[no_such_plugin]"])


def test_entry_point_plugins_load_without_being_named(tmp_path, monkeypatch):
    """An installed distribution declaring an entry point in group fedalign_dist.plugins."""
    (tmp_path / "ep_strategy.py").write_text(
        "from fedalign_dist.strategies import register\n"
        "from fedalign_dist.strategies.fedavg import FedAvg\n"
        "@register('ep_fedavg')\nclass EpFedAvg(FedAvg):\n    pass\n")
    info = tmp_path / "ep_strategy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-strategy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedalign_dist.plugins]\nep = ep_strategy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    assert load_config(None, ["strategy.name=ep_fedavg"]).strategy.name == "ep_fedavg"


def test_round_loop_names_no_strategy_or_family():
    from fedalign_dist.models.families import FAMILIES
    from fedalign_dist.strategies import registered_strategies
    names = set(registered_strategies()) | set(FAMILIES) | {"llama", "amole", "fedamole", "probe"}
    for module in ("runner.py", "clients/client_round.py", "run_lifecycle.py"):
        code = (REPO / "fedalign_dist" / module).read_text()
        # as a string anywhere, or as a word in code or comments ('local' is also a plain word; the
        # command fedalign-dist is not the strategy)
        found = sorted(n for n in names if re.search(rf"[\"']{re.escape(n)}[\"']", code) or
                       (n != "local" and re.search(rf"\b{re.escape(n)}\b(?!-dist)", code, flags=re.IGNORECASE)))
        assert not found, f"{module} names {found}"
