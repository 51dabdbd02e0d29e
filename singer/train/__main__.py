"""`python -m singer.train` (what `accelerate launch ... -m singer.train` runs on every process)."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m singer.train", description="Train SINGER (see singer/train/loop.py).")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                        help="override a parameter, e.g. -S train.steps=20")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see singer/cli.py: before torch loads
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from singer.config import load_config
    from singer.data.common import StageError
    from singer.train.loop import train

    try:
        result = train(load_config(args.params, preset=args.preset, overrides=args.overrides))
    except (StageError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result:
        print("train done: " + " ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
