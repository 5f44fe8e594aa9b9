"""JSON as the project writes it into files: a non-finite float (a metric of zero examples,
a diverged score) becomes null, as the README promises. Python's default would write NaN or
Infinity, which is not JSON: strict readers (jq, JavaScript, pandas' json engine) refuse the
file. Every JSON file the package writes goes through `dumps`; allow_nan=False makes any
value that escaped the conversion an error here rather than a broken file."""
from __future__ import annotations

import json
import math


def finite(value):
    """`value` with every non-finite float, at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    return json.dumps(finite(value), allow_nan=False, **kwargs)
