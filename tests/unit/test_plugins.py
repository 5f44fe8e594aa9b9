"""Extension without editing the package: a strategy, a data source or a task type (each with
its config section) from a module named in `imports` / --import, or from an installed
package's entry point; and the round loop names no strategy, model family, source or task."""
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


def test_imported_data_source_and_task_type(tmp_path, monkeypatch):
    (tmp_path / "article.tsv").write_text("".join(f"{'ab'[i % 2]}\tarticle number {i}\n" for i in range(40)))
    (tmp_path / "question_task.py").write_text(
        "from fedalign_dist.config import ConfigSection\n"
        "from fedalign_dist.data.classification import ClassificationTask\n"
        "from fedalign_dist.data.registry import register_task\n"
        "class QuestionConfig(ConfigSection):\n"
        "    prompt_suffix: str = '\\nWhich label?'\n"
        "    \"\"\"Asked after the text.\"\"\"\n"
        "@register_task('question')\nclass Question(ClassificationTask):\n    config_section = QuestionConfig\n")
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="unknown data.name 'tsv_line'.*did you mean 'tsv_lines'"):
        load_config(None, ["imports=[tsv_source]", "data.name=tsv_line"])
    with pytest.raises(ConfigError, match="did you mean 'data.tsv_lines.path'"):
        load_config(None, ["imports=[tsv_source]", "data.tsv_lines.pth=x"])
    cfg = load_config(None, ["imports=[tsv_source, question_task]", "data.name=tsv_lines", "data.task=question",
                             f"data.tsv_lines.path={tmp_path / 'article.tsv'}", "data.partition=iid",
                             "data.min_client_examples=3", "fed.num_clients=4", "fed.clients_per_round=2"])
    from fedalign_dist.config_docs import describe_config
    shown = describe_config(cfg)
    assert "data.tsv_lines.path" in shown and "data.question.prompt_suffix" in shown and "Asked after" in shown

    from fedalign_dist.data.federated import build_federated_data
    from fedalign_dist.data.tokenizer import ByteTokenizer
    data = build_federated_data(cfg.data, 4, 0, ByteTokenizer())
    assert data.task.name == "question" and data.label_names == ["a", "b"] and len(data.examples) == 40
    first = data.examples[0]
    assert bytes(first["prompt"][1:-len("\nWhich label?")]).decode() == "article number 0"
    assert data.describe("tsv_lines")["clients"][0] == {"test": 2, "val": 1, "train": 7}
    with pytest.raises(ConfigError, match="data.partition=natural needs .*data.name=bbc_news has none"):
        load_config(None, ["data.partition=natural"])


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


# Where naming a strategy is what the code is for: the systems suite's list of methods it times,
# the diagnostic (it trains with FedAlign-MoE's statistics) and the config's default strategy.
NAMES_A_STRATEGY = {"benchmark/systems.py": None, "diagnose/command.py": {"strategy.name=fedalign"},
                    "config_sections.py": {"fedavg"}}


def test_no_code_outside_a_strategy_names_one():
    """What a strategy can do (run under client groups, its privacy refusals) is declared by the
    strategy, so a plugin strategy gets the same treatment: no string in the package's code
    outside strategies/ is a strategy's name (docstrings and comments may speak of them)."""
    import ast

    from fedalign_dist.strategies import registered_strategies
    names = set(registered_strategies())
    for path in sorted((REPO / "fedalign_dist").rglob("*.py")):
        module = path.relative_to(REPO / "fedalign_dist").as_posix()
        if module.startswith("strategies/"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        found = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and id(node) not in docstrings
                 and isinstance(node.value, str) and (node.value in names or node.value.removeprefix("strategy.name=")
                                                      in names)}
        allowed = NAMES_A_STRATEGY.get(module, set())
        assert allowed is None or found <= allowed, f"{module} names {sorted(found - allowed)}"


def test_round_loop_names_no_strategy_family_source_or_task():
    from fedalign_dist.data.registry import registered_sources, registered_tasks
    from fedalign_dist.models.families import FAMILIES
    from fedalign_dist.strategies import registered_strategies
    names = (set(registered_strategies()) | set(FAMILIES) | {"llama", "amole", "fedamole", "probe"} |
             set(registered_sources()) | set(registered_tasks()) | {"accuracy"})
    for module in ("runner.py", "client_round.py", "clients/trainer.py", "run_lifecycle.py",
                   "data/federated.py", "metrics.py"):
        code = (REPO / "fedalign_dist" / module).read_text()
        # as a string anywhere, or as a word in code or comments ('local' is also a plain word; the
        # command fedalign-dist is not the strategy)
        found = sorted(n for n in names if re.search(rf"[\"']{re.escape(n)}[\"']", code) or
                       (n != "local" and re.search(rf"\b{re.escape(n)}\b(?!-dist)", code, flags=re.IGNORECASE)))
        assert not found, f"{module} names {found}"
