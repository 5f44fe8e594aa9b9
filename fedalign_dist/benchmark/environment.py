"""What a benchmark ran on: date, machine and library versions, for the header of its tables."""
from __future__ import annotations

import datetime
import os
import platform
import sys
from importlib import metadata

PACKAGES = ("torch", "transformers", "deepspeed", "peft", "accelerate", "scipy")


def environment_line() -> str:
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return (f"Written {datetime.date.today().isoformat()} on {platform.system()} {platform.machine()}, "
            f"{os.cpu_count()} CPU core(s), Python {sys.version.split()[0]}; {', '.join(versions)}.")
