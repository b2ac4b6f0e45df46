"""`python -m jaxppo.plot RUN_DIR`: writes the training curves of a run to RUN_DIR/plots/ and prints the paths."""

from __future__ import annotations

import argparse
import sys

from jaxppo.errors import JaxppoError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxppo.plot", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (train.output_dir) holding metrics.jsonl")
    args = parser.parse_args(argv)
    try:
        from jaxppo.run.plots import plot_run

        paths = plot_run(args.run_dir)
    except JaxppoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not paths:
        print(f"no metrics logged yet in {args.run_dir}: nothing to plot", file=sys.stderr)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
