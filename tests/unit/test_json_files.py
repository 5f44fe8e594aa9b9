"""Every JSON file the package writes is strict JSON: a non-finite number is written as null
(the README's promise), never as NaN or Infinity, which jq, JavaScript and pandas refuse."""
import ast
import json
import math
from pathlib import Path

from fedalign_dist import checkpoint
from fedalign_dist.metrics import MetricsWriter

PACKAGE = Path(__file__).resolve().parents[2] / "fedalign_dist"
WIRE = {"json_files.py", "distributed/collectives.py", "distributed/sharded_aggregation.py"}
"""The helper itself, and messages between ranks (never a file: NaN must travel as NaN there)."""


def strict(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_the_metrics_log_and_the_summary_write_null_for_non_finite_numbers(tmp_path):
    # what a round with no personalised examples scores (0/0) and a diverged perplexity
    record = {"round": 0, "personalized_accuracy": math.nan, "global_perplexity": math.inf,
              "nested": {"per_rank": [1.5, -math.inf]}}
    writer = MetricsWriter(tmp_path)
    writer.write(record)
    writer.close()
    logged = strict((tmp_path / "metrics.jsonl").read_text())
    assert logged["personalized_accuracy"] is None and logged["global_perplexity"] is None
    assert logged["nested"] == {"per_rank": [1.5, None]}
    checkpoint.write_json(tmp_path / "summary.json", {"final_personalized_accuracy": math.nan, "rounds": 2})
    assert strict((tmp_path / "summary.json").read_text()) == {"final_personalized_accuracy": None, "rounds": 2}


def test_every_json_writer_of_the_package_goes_through_the_helper():
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in
                    ("dump", "dumps") and isinstance(node.func.value, ast.Name) and node.func.value.id == "json"):
                found.append(f"{rel}:{node.lineno}")
    assert all(place.split(":")[0] in WIRE for place in found), [p for p in found if p.split(":")[0] not in WIRE]

