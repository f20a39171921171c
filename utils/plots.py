"""Figures of a run's `metrics.jsonl`: `out_dir/plots/` during training (rank 0, at every evaluation and at the end)
and the comparison of several runs (`scripts/plot_runs.py`). matplotlib's object API on the Agg canvas: no display,
no global pyplot state."""

import io
import json
import math
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure

from utils.errors import InputError
from utils.files import write_atomically


def read_rows(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl; InputError when there are none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"{run_dir}: no metrics.jsonl (not a training run folder?)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise InputError(f"{path}:{number}: malformed JSON") from None
    if not rows:
        raise InputError(f"{path} is empty: the run has not logged a step yet")
    return rows


def series(rows: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, y) of the rows that hold a finite number under `key` (and under `x`)."""
    points = [(row[x], row[key]) for row in rows
              if isinstance(row.get(key), (int, float)) and isinstance(row.get(x), (int, float))
              and math.isfinite(row[key])]
    return [point[0] for point in points], [point[1] for point in points]


def save_figure(figure: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_atomically(path, buffer.getvalue())
    return path


def panel(figure: Figure, position: int, columns: int, title: str, rows: list[dict], keys: list[str],
          x: str = "step", log_x: bool = False, log_y: bool = False) -> None:
    """One subplot with a line per key that has data; none when no key has."""
    lines = [(key, *series(rows, key, x)) for key in keys]
    lines = [line for line in lines if line[1]]
    if not lines:
        return
    axes = figure.add_subplot(1, columns, position)
    for key, xs, ys in lines:
        axes.plot(xs, ys, label=key, marker="o" if len(xs) < 30 else None, markersize=3)
    axes.set_title(title)
    axes.set_xlabel("tokens seen" if x == "tokens_seen" else x.replace("_", " "))
    if log_x:
        axes.set_xscale("log")
    if log_y and all(value > 0 for _, _, ys in lines for value in ys):
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the run's figures to run_dir/plots/ and return their paths: loss against steps and tokens seen,
    the optimizer's learning rate and gradient norm, throughput; the expert load of an MoE run; the rewards of a
    preference run; the rewards, completion lengths and policy statistics of a GRPO run."""
    run_dir = Path(run_dir)
    rows, folder, written = read_rows(run_dir), run_dir / "plots", []
    folder.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    panel(figure, 1, 2, "loss", rows, ["loss", "val_loss"])
    panel(figure, 2, 2, "loss against tokens seen", rows, ["loss", "val_loss"], x="tokens_seen", log_x=True)
    written.append(save_figure(figure, folder / "loss.png"))
    figure = Figure(figsize=(15, 4), layout="constrained")
    panel(figure, 1, 3, "learning rate", rows, ["lr"])
    panel(figure, 2, 3, "gradient norm (before clipping)", rows, ["grad_norm"], log_y=True)
    panel(figure, 3, 3, "throughput (tokens/s)", rows, ["tokens_per_s"])
    written.append(save_figure(figure, folder / "optimization.png"))
    if any("reward_accuracy" in row for row in rows):
        figure = Figure(figsize=(12, 4.5), layout="constrained")
        panel(figure, 1, 2, "reward accuracy", rows, ["reward_accuracy", "val_reward_accuracy"])
        panel(figure, 2, 2, "rewards (validation)", rows,
              ["val_rewards_chosen", "val_rewards_rejected", "val_reward_margin"])
        written.append(save_figure(figure, folder / "preference.png"))
    if any("reward" in row for row in rows):
        figure = Figure(figsize=(15, 4), layout="constrained")
        panel(figure, 1, 3, "reward (sampled; greedy on validation prompts)", rows,
              ["reward", "val_reward", "val_accuracy"])
        panel(figure, 2, 3, "completion length (tokens)", rows, ["completion_length"])
        panel(figure, 3, 3, "policy", rows, ["entropy", "clip_ratio", "kl", "frac_reward_zero_std"])
        written.append(save_figure(figure, folder / "reward.png"))
    loads = [(row["step"], row["expert_load"]) for row in rows if row.get("expert_load")]
    if loads:
        written.append(save_figure(expert_load_figure(loads), folder / "expert_load.png"))
    return written


def expert_load_figure(loads: list[tuple[int, list[list[float]]]]) -> Figure:
    """One heatmap per MoE layer: each expert's share of the routed tokens over the steps, scaled so that 1 is a
    perfectly even load."""
    steps = [step for step, _ in loads]
    load = np.array([layers for _, layers in loads])  # [rows, layers, experts]
    layers, experts = load.shape[1], load.shape[2]
    figure = Figure(figsize=(12, 1.2 + 1.6 * layers), layout="constrained")
    for layer in range(layers):
        axes = figure.add_subplot(layers, 1, layer + 1)
        image = axes.imshow(load[:, layer].T * experts, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest",
                            extent=(steps[0], steps[-1], experts - 0.5, -0.5))
        axes.set_ylabel(f"layer {layer}\nexpert")
        figure.colorbar(image, ax=axes, label="load x experts")
    axes.set_xlabel("step")
    return figure


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Keys that say where a run writes and how often, not what it learns: never what tells two runs apart.
BOOKKEEPING = ("checkpoint.", "logging.", "eval.", "train.out_dir", "train.device", "data.cache_dir",
               "data.num_workers")


def differing_keys(configs: list[dict]) -> list[str]:
    """The config keys that shape training and are not the same in every run."""
    flat = [flatten(config) for config in configs]
    keys = sorted(set().union(*flat))
    return [key for key in keys
            if not key.startswith(BOOKKEEPING) and len({repr(entry.get(key)) for entry in flat}) > 1]


def run_summary(rows: list[dict]) -> dict:
    """Best validation loss and its step, median training throughput, wall time of a run."""
    steps, losses = series(rows, "val_loss")
    best = min(range(len(losses)), key=losses.__getitem__) if losses else None
    _, throughput = series(rows, "tokens_per_s")
    _, elapsed = series(rows, "elapsed_s")
    return {"best_val_loss": losses[best] if best is not None else None,
            "best_step": steps[best] if best is not None else None,
            "tokens_per_s": float(np.median(throughput)) if throughput else None,
            "wall_s": max(elapsed) if elapsed else None}


def compare_runs(run_dirs: list[str | Path], metric: str, out: str | Path) -> tuple[Path, list[dict]]:
    """One figure of `metric` for every run (against steps, and against wall time where the rows have it),
    labelled by folder and the config keys that differ between the runs. Returns the figure's path and a summary
    per run."""
    runs = [(Path(run_dir), read_rows(run_dir)) for run_dir in run_dirs]
    available = sorted({key for _, rows in runs for row in rows for key, value in row.items()
                        if isinstance(value, (int, float)) and key != "step"})
    if metric not in available:
        raise InputError(f"no run has the metric {metric!r}; available: {', '.join(available)}")
    configs = []
    for run_dir, _ in runs:
        path = run_dir / "config.yaml"
        configs.append((yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {})
    keys = differing_keys(configs)[:4]
    figure = Figure(figsize=(12, 4.5 + 0.25 * len(runs)), layout="constrained")
    by_step = figure.add_subplot(1, 2, 1)
    by_time = figure.add_subplot(1, 2, 2)
    summaries = []
    for (run_dir, rows), config in zip(runs, configs):
        flat = flatten(config)
        label = ", ".join([str(run_dir)] + [f"{key}={flat.get(key)}" for key in keys])
        by_step.plot(*series(rows, metric), label=label)
        by_time.plot(*series(rows, metric, x="elapsed_s"), label=label)
        summaries.append({"run": str(run_dir), "label": label, **run_summary(rows)})
    for axes, x in ((by_step, "step"), (by_time, "wall time (s)")):
        axes.set_xlabel(x)
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
    figure.legend(*by_step.get_legend_handles_labels(), loc="outside lower center", fontsize="small")
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return save_figure(figure, out), summaries
    except OSError as error:
        raise InputError(f"cannot write {out}: {error}") from None
