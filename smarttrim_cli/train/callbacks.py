"""What the loop reports, as callbacks: the progress bar, the JSON-lines log in the state directory, the training
plot of the written model, and a caller's per-step hook. The loop calls, on every callback in order,

    row(row)                   a history row was recorded (step, val, val_full, val_calibrated, ...)
    step(step, line)           an optimizer step ended; ``line``: the rule's one-line summary of the last logged row
    note(text)                 a line for the user (validation results, warnings)
    written(out, history, summary)   rank 0 wrote the model directory
    close()                    the loop ended, finished or not
"""
from __future__ import annotations

from pathlib import Path

from . import checkpointing as ck


class Callback:
    def row(self, row: dict):
        pass

    def step(self, step: int, line: str):
        pass

    def note(self, text: str):
        pass

    def written(self, out: Path, history: list, summary: dict):
        pass

    def close(self):
        pass


class ProgressBar(Callback):
    def __init__(self, total: int, start: int, label: str = "finetune", console=None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn(f"[bold]{label}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                          TextColumn("{task.fields[info]}"), TextColumn("ETA"), TimeRemainingColumn(),
                          console=console, transient=False)
        self.p.start()
        self.task = self.p.add_task("steps", total=total, completed=start, info="starting")

    def step(self, step, line):
        self.p.update(self.task, completed=step, info=line)

    def note(self, text):
        self.p.console.print(text, highlight=False)

    def close(self):
        self.p.stop()


class JsonlLog(Callback):
    """``log.jsonl`` in the state directory, one row at a time (a crash keeps every row written before it)."""

    def __init__(self, path: Path, history: list):
        self.path = Path(path)
        ck.write_jsonl(self.path, history)  # a resumed run: the checkpoint's rows, not what came after it

    def row(self, row):
        ck.append_jsonl(self.path, row)


class TrainingPlot(Callback):
    """``training.png`` in the written model directory."""

    def __init__(self, title: str):
        self.title = title

    def written(self, out, history, summary):
        try:
            plot_history(history, Path(out) / "training.png", self.title)
        except Exception as e:  # a plotting failure must not lose a finished training run
            summary["plot_error"] = f"{type(e).__name__}: {e}"


class OnStep(Callback):
    """``fn(step)`` after every optimizer step (tests use it to interrupt a run)."""

    def __init__(self, fn):
        self.fn = fn

    def step(self, step, line):
        self.fn(step)


def plot_history(history: list[dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in history if r.get("event") == "step"]
    vals = [r for r in history if r.get("event") == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = [r["step"] for r in steps]
    for key, lab in (("loss", "total"), ("task", "task"), ("distill", "distill"), ("cost", "cost penalty")):
        if any(key in r for r in steps):  # distill: absent from the steps that ran no teacher (a faded alpha 0)
            axes[0].plot(x, [r.get(key, float("nan")) for r in steps], label=lab)
    axes[0].set_xlabel("step"), axes[0].set_title("loss"), axes[0].legend()
    if steps and "target" in steps[0]:
        axes[1].plot(x, [r["ratio"] for r in steps], label="train batch mean (soft)")
        lo = [r["ratio"] - r["ratio_std"] for r in steps]
        hi = [r["ratio"] + r["ratio_std"] for r in steps]
        axes[1].fill_between(x, lo, hi, alpha=0.2, label="± spread")
        axes[1].plot(x, [r["target"] for r in steps], "k--", label="curriculum target")
    if vals:
        axes[1].errorbar([v["step"] for v in vals], [v["ratio_mean"] for v in vals],
                         yerr=[v["ratio_std"] for v in vals], fmt="o", label="validation (hard)")
        axes[2].plot([v["step"] for v in vals], [v["score"] for v in vals], "o-")
    cal = [r for r in history if r.get("event") == "val_calibrated" and r.get("n")]
    if cal:
        axes[1].plot([cal[-1]["step"]], [cal[-1]["ratio_mean"]], "r*", markersize=12,
                     label=f"written model (threshold {cal[-1]['threshold']:.2f})")
        axes[2].plot([cal[-1]["step"]], [cal[-1]["score"]], "r*", markersize=12, label="written model")
        axes[2].legend(fontsize=8)
    axes[1].set_ylim(0, 1.05), axes[1].set_xlabel("step"), axes[1].set_title("FLOPs ratio (trimmed / full)")
    axes[1].legend(fontsize=8)
    axes[2].set_xlabel("step"), axes[2].set_title("validation score")
    fig.suptitle(title)
    fig.tight_layout()
    from ..atomic import atomic_path
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)

