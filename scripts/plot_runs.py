"""Compare training runs: `python scripts/plot_runs.py out/a out/b ... [--metric val_loss] [--out compare.png]`.

Draws one metric of every run's metrics.jsonl on one figure (against steps and against wall time), each run labelled
by its folder and the config keys that differ between the runs, and prints each run's best validation loss, its
step, the median training throughput and the wall time.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script, Python puts scripts/ first on the path; import from the repository root instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402

from utils.errors import exit_on_input_error  # noqa: E402
from utils.plots import compare_runs  # noqa: E402


def figure(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (train.out_dir), each with its metrics.jsonl")
    parser.add_argument("--metric", default="val_loss", help="a metrics.jsonl key (default val_loss)")
    parser.add_argument("--out", default="compare.png", help="the figure to write (default compare.png)")
    args = parser.parse_args(argv)
    path, summaries = compare_runs(args.runs, args.metric, args.out)
    width = max(len(summary["run"]) for summary in summaries)
    print(f"{'run':<{width}}  {'best val_loss':>13}  {'at step':>7}  {'tokens/s':>9}  {'wall s':>7}")
    for summary in summaries:
        print(f"{summary['run']:<{width}}  {figure(summary['best_val_loss'], 4):>13}  "
              f"{figure(summary['best_step'], 0):>7}  {figure(summary['tokens_per_s'], 0):>9}  "
              f"{figure(summary['wall_s'], 1):>7}")
    print(f"figure: {path}")
    return summaries


if __name__ == "__main__":
    exit_on_input_error(main)()
