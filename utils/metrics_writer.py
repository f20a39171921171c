"""The run's metrics: `metrics.jsonl` (one JSON row per logged step, evaluation or final measurement),
`samples.jsonl` (the text the model writes at every evaluation) and swanlab."""

import json
from pathlib import Path

SWANLAB_MODES = {"offline": "offline", "local": "local", "cloud": "online", "disabled": "disabled"}


class MetricsWriter:
    """Writes on rank 0 only (`enabled`). A resumed run's file is cut back to the resumed step first, so that it
    reads like the file of an uninterrupted run."""

    def __init__(self, out_dir: Path, enabled: bool, swanlab_mode: str, project: str, config: dict,
                 resume_step: int | None):
        self.path, self.samples_path = out_dir / "metrics.jsonl", out_dir / "samples.jsonl"
        self.enabled = enabled
        self.run = None
        if not enabled:
            return
        for path in (self.path, self.samples_path):
            if resume_step is not None and path.exists():
                rows = [line for line in path.read_text(encoding="utf-8").splitlines()
                        if line.strip() and json.loads(line)["step"] <= resume_step]
                path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
            elif resume_step is None:
                path.write_text("")
        if swanlab_mode != "disabled":
            import swanlab  # imported lazily: it is slow to import and optional at run time

            self.run = swanlab.init(project=project, name=out_dir.name, config=config,
                                    mode=SWANLAB_MODES[swanlab_mode], log_dir=str(out_dir / "swanlog"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.run is not None:
            # Scalars only: lists (the per-expert load) stay in metrics.jsonl.
            self.run.log({key: value for key, value in row.items()
                          if key != "step" and isinstance(value, (int, float))}, step=row["step"])

    def write_samples(self, step: int, prompts: list[str], samples: list[str], final: bool = False) -> None:
        """One samples.jsonl row per prompt (`final`: written by the saved final model)."""
        self.write_sample_rows(step, [{"prompt": prompt, "sample": sample, **({"final": True} if final else {})}
                                      for prompt, sample in zip(prompts, samples)])

    def write_sample_rows(self, step: int, rows: list[dict]) -> None:
        """samples.jsonl rows (`prompt`, `sample` and whatever else a row holds, such as its reward) and swanlab
        texts."""
        if not self.enabled:
            return
        with self.samples_path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")
        if self.run is not None:
            import swanlab

            texts = [swanlab.Text(row["sample"], caption=row["prompt"]) for row in rows]
            self.run.log({"samples": texts}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
