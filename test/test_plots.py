"""utils/plots.py and scripts/plot_runs.py: the run's figures, refreshed by the engine, and the comparison of runs."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from matplotlib.image import imread

import utils.plots
from training import fit, make_config, read_metrics
from utils.errors import InputError, exit_on_input_error
from utils.plots import compare_runs, differing_keys, plot_run, read_rows, run_summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import plot_runs  # noqa: E402


def write_run(folder: Path, rows: list[dict], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def training_rows(steps: int = 6, val_every: int = 2, scale: float = 1.0, **extra) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        rows.append({"step": step, "loss": scale * (5 - 0.5 * step), "lr": 1e-3, "grad_norm": 1.0 / step,
                     "tokens_per_s": 1000.0 + step, "tokens_seen": 512 * step, "elapsed_s": 2.0 * step, **extra})
        if step % val_every == 0:
            rows.append({"step": step, "val_loss": scale * (5 - 0.4 * step), "tokens_seen": 512 * step,
                         "elapsed_s": 2.0 * step + 1})
    return rows


def is_drawn(path: Path) -> bool:
    """A readable PNG with something on it (not one flat colour)."""
    image = imread(path)
    return image.ndim == 3 and image.shape[0] > 100 and float(image.std()) > 0.01


def test_a_dense_run_gets_loss_and_optimization_figures_only(tmp_path):
    run = write_run(tmp_path / "run", training_rows())
    written = plot_run(run)
    assert [path.name for path in written] == ["loss.png", "optimization.png"]
    assert all(is_drawn(path) for path in written)
    assert sorted(path.name for path in (run / "plots").iterdir()) == ["loss.png", "optimization.png"]


def test_moe_and_preference_runs_get_their_own_figures(tmp_path):
    load = [[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]]
    rows = training_rows(expert_load=load, reward_accuracy=0.75)
    rows += [{"step": 6, "val_loss": 0.6, "val_reward_accuracy": 0.8, "val_rewards_chosen": 0.1,
              "val_rewards_rejected": -0.2, "val_reward_margin": 0.3}]
    written = plot_run(write_run(tmp_path / "run", rows))
    assert [path.name for path in written] == ["loss.png", "optimization.png", "preference.png", "expert_load.png"]
    assert all(is_drawn(path) for path in written)


def test_expert_load_heatmap_is_scaled_so_an_even_load_is_one():
    figure = utils.plots.expert_load_figure([(1, [[0.5, 0.5]]), (2, [[1.0, 0.0]])])
    (image,) = figure.axes[0].get_images()
    assert image.get_array().tolist() == [[1.0, 2.0], [1.0, 0.0]]  # [expert, step]
    assert len(figure.axes) == 2  # one layer's heatmap and its colour bar


@pytest.mark.parametrize("content,message", [(None, "no metrics.jsonl"), ("", "is empty"),
                                             ('{"step": 1}\n{oops\n', "metrics.jsonl:2: malformed JSON")])
def test_unreadable_metrics_are_input_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(InputError, match=message):
        read_rows(tmp_path)


def test_summary_and_the_keys_that_tell_runs_apart(tmp_path):
    rows = training_rows(steps=6) + [{"step": 7, "loss": float("nan"), "tokens_per_s": 5.0, "elapsed_s": 20.0}]
    summary = run_summary(rows)
    # The best of val_loss 4.2, 3.4, 2.6 is the last; the median of 1001..1006 and 5 is 1003.
    assert summary == {"best_val_loss": pytest.approx(2.6), "best_step": 6, "tokens_per_s": 1003.0, "wall_s": 20.0}
    configs = [{"optim": {"lr": 1e-3, "min_lr": 1e-4}, "train": {"out_dir": "a", "seed": 1},
                "logging": {"every_steps": 1}},
               {"optim": {"lr": 3e-3, "min_lr": 1e-4}, "train": {"out_dir": "b", "seed": 1},
                "logging": {"every_steps": 5}}]
    assert differing_keys(configs) == ["optim.lr"]


def test_compare_runs_labels_each_run_by_what_differs(tmp_path):
    first = write_run(tmp_path / "a", training_rows(), {"optim": {"lr": 0.001}, "train": {"out_dir": "a"}})
    second = write_run(tmp_path / "b", training_rows(scale=0.5), {"optim": {"lr": 0.003}, "train": {"out_dir": "b"}})
    path, summaries = compare_runs([first, second], "val_loss", tmp_path / "figures" / "compare.png")
    assert is_drawn(path)
    assert [summary["best_val_loss"] for summary in summaries] == [pytest.approx(2.6), pytest.approx(1.3)]
    assert [summary["label"] for summary in summaries] == [f"{first}, optim.lr=0.001", f"{second}, optim.lr=0.003"]


def test_plot_runs_prints_the_table_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    first = write_run(tmp_path / "a", training_rows())
    second = write_run(tmp_path / "b", training_rows(scale=0.5))
    plot_runs.main([str(first), str(second), "--out", str(tmp_path / "compare.png")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "best", "val_loss", "at", "step", "tokens/s", "wall", "s"]
    assert lines[1].split()[1:] == ["2.6000", "6", "1004", "13.0"] and lines[2].split()[1] == "1.3000"
    assert (tmp_path / "compare.png").is_file()
    for argv, message in (([str(first), "--metric", "nope"], "no run has the metric 'nope'; available: "),
                          ([str(tmp_path)], "no metrics.jsonl")):
        with pytest.raises(SystemExit) as exit_info:
            exit_on_input_error(lambda: plot_runs.main(argv))()
        error = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(error) == 1 and message in error[0]


def test_training_refreshes_the_plots_at_every_evaluation_unless_told_not_to(tmp_path, monkeypatch):
    calls = []
    original = utils.plots.plot_run
    monkeypatch.setattr(utils.plots, "plot_run", lambda run_dir: calls.append(run_dir) or original(run_dir))
    config = make_config(tmp_path / "run", tmp_path / "cache", train={"max_steps": 4}, eval={"every_steps": 2},
                         logging={"plots": True})
    fit(config)
    # Two evaluations and the end of the run.
    assert len(calls) == 3
    assert (tmp_path / "run" / "plots" / "loss.png").is_file()
    _, evaluations = read_metrics(tmp_path / "run")
    assert all(row["tokens_seen"] > 0 and row["elapsed_s"] > 0 for row in evaluations)
    fit(make_config(tmp_path / "quiet", tmp_path / "cache", train={"max_steps": 2}, eval={"every_steps": 2}))
    assert len(calls) == 3 and not (tmp_path / "quiet" / "plots").exists()


def test_a_figure_that_fails_costs_a_warning_not_the_run(tmp_path, monkeypatch):
    def broken(run_dir):
        raise ValueError("no room on the canvas")

    monkeypatch.setattr(utils.plots, "plot_run", broken)
    summary = fit(make_config(tmp_path / "run", tmp_path / "cache", train={"max_steps": 2}, eval={"every_steps": 2},
                              logging={"plots": True}))
    assert summary["reason"] == "finished"
    assert "plots not refreshed: no room on the canvas" in (tmp_path / "run" / "train.log").read_text()
