"""`fedalign-dist run`'s checks before any rank starts (model path, ranks against clients, the
data and its partition, the run folder), in a child process of the launcher: building the data
to check it holds a few hundred MB that the launcher would otherwise keep for the whole run.
A refusal is one line on stderr and exit code 2, as from the launcher itself. On success
the resolved run folder is written to --tell (JSON), so the launcher itself never loads the
config, whose validation imports the strategies and with them torch.

    python -m fedalign_dist.launch_checks --nproc N [--tell FILE] [--config F] [key=value ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedalign_dist import json_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--tell", help="write {\"run_dir\": ...} here when the checks pass")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from fedalign_dist.config import ConfigError, load_config
    from fedalign_dist.train import check_before_launch, quiet_libraries
    try:
        cfg = load_config(args.config, args.overrides, world_size=args.nproc)
        quiet_libraries()
        check_before_launch(cfg, args.nproc)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"fedalign-dist: error: {err}", file=sys.stderr, flush=True)
        return 2
    if args.tell:
        Path(args.tell).write_text(json_files.dumps({"run_dir": str(cfg.run_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
