"""A training run's folder: what --out holds, what may continue it, and the metrics a run writes there.

    OUT/settings.json      every flag of the run and its process count (`run_settings`)
    OUT/metrics.jsonl      one JSON row per optimizer step (`MetricsLog`), also sent to TensorBoard or
                           Weights & Biases with --report-to (`Tracker`)
    OUT/checkpoint-STEP/   the checkpoints (written by train.save_checkpoint); `latest_checkpoint` finds
                           the newest complete one
    OUT/final/             the model after the last step
    OUT/*_curves.png       the metrics as curves (`plot_metrics`)

One run per folder: a folder that holds a run is refused unless --resume (continue it with the same
settings, `check_run_folder`) or --overwrite (`remove_run`). eval.py checks its own folder's settings
with `check_settings`. Nothing here touches a model or a process group: train.start_run does that.
"""
import importlib
import json
import netrc
import os
import re
import shutil
from pathlib import Path

import numpy as np

import errors
import model as M


# ---- the run folder: one run per --out ----

# Flags that do not change a run's results: a resumed run may set them otherwise.
RESUMABLE = ("out", "resume", "overwrite", "save_every", "grad_checkpointing", "embed_cache_gb",
             "embed_cache_offload", "embed_cache_dir", "gpu_memory_utilization", "engine_sleep", "report_to",
             "decode_workers")


def check_settings(path, settings: dict, ignore=(), holds: str = "results",
                   remedy: str = "use another output folder") -> None:
    """Refuse to continue what a folder holds with settings that would change its results.

    `path` is the JSON file of the settings the folder's earlier part was made with (nothing to check
    where there is none). Every setting that differs is named, in the file's order, so the first one
    first; those in `ignore` may differ. eval.py checks its predictions with it, sft.py and rl.py
    their runs (`check_run_folder`). Example:
        runs/rl holds a run made with other settings (sp_size: 1 -> 2, engine: 'torch' -> 'vllm'); ...
    """
    path = Path(path)
    if not path.exists():
        return
    before = json.loads(path.read_text())
    changed = [k for k in [*before, *(k for k in settings if k not in before)]
               if k not in ignore and before.get(k) != settings.get(k)]
    if changed:
        was = lambda k: repr(before[k]) if k in before else "(a setting this code did not have then)"
        diff = ", ".join(f"{k}: {was(k)} -> {settings.get(k)!r}" for k in changed)
        raise errors.UsageError(f"{path.parent} holds {holds} made with other settings ({diff}); {remedy}")


def run_settings(args) -> dict:
    """What a run's results depend on: every flag (--init and --data as absolute paths, so that a
    resume started from another folder compares equal) and the number of processes (the RNG states
    are per rank)."""
    settings = vars(args).copy()
    for key in ("init", "data"):
        if isinstance(settings.get(key), str):
            settings[key] = os.path.abspath(settings[key])
    return {**settings, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}


def run_outputs(out) -> list[str]:
    """What of a run the folder `out` holds, for messages: e.g. ["metrics.jsonl (12 steps)",
    "checkpoint-10", "final/"]. Empty when there is nothing to lose: no folder, or only what a run
    writes before its first step (settings.json, an empty metrics.jsonl)."""
    out = Path(out)
    steps = len(MetricsLog.read(out / "metrics.jsonl"))
    checkpoints = sorted((int(m.group(1)), p.name) for p in out.glob("checkpoint-*")
                         if (m := CHECKPOINT_RE.search(p.name)))
    return ([f"metrics.jsonl ({steps} steps)"] if steps else []) + [name for _, name in checkpoints] + (
        ["final/"] if (out / "final").exists() else [])


def check_run_folder(out: Path, args, settings: dict, resumable=()) -> Path | None:
    """What this run may do with --out, decided before anything is loaded or written. Returns the
    checkpoint to resume from (None: start from --init).

      - a folder with no run in it (`run_outputs` is empty): start there, with or without --resume
      - a run there: refused, unless --overwrite (start_run removes it first) or --resume
      - --resume: continue from the newest complete checkpoint, if the run's settings.json holds the
        same settings (`check_settings`; those in RESUMABLE and `resumable` may differ). Refused when
        there is no complete checkpoint, or when the run already finished its --steps (final/ written)
    """
    found = run_outputs(out)
    if not found or args.overwrite:
        return None
    if not args.resume:
        raise errors.UsageError(f"{out} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                         "--overwrite to replace it, or choose another --out")
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        old = any(out.glob("checkpoint-*/trainer_state.pt"))
        hint = (" (an older version's checkpoints keep a pickled trainer_state.pt, which is not loaded: "
                "unpickling runs code)" if old else "")
        raise errors.UsageError(f"--resume: {out} holds a run ({', '.join(found)}) but no complete checkpoint to "
                         f"continue from{hint}; pass --overwrite to start it again, or choose another --out")
    steps_done = max((r["step"] for r in MetricsLog.read(out / "metrics.jsonl")), default=0)
    if (out / "final").exists() and steps_done >= args.steps:
        raise errors.UsageError(f"--resume: the run in {out} already finished its {args.steps} steps (final/ is "
                         "written); nothing to resume")
    check_settings(out / "settings.json", settings, ignore=(*RESUMABLE, *resumable), holds="a run",
                   remedy="resume with the flags it was started with, or pass --overwrite or another --out")
    return checkpoint


def remove_run(out: Path) -> None:
    """Delete what a training run writes into `out` (for --overwrite), and nothing else there."""
    for pattern in ("metrics.jsonl", "settings.json", "*_curves.png", "final", "final.*", "checkpoint-*",
                    "tensorboard", "wandb"):
        for path in out.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


# ---- the checkpoints a run folder holds ----

TRAINER_STATE = "trainer_state.json"  # in a checkpoint: step, every rank's RNG state, extra (JSON, no pickle)
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)$")


def latest_checkpoint(out_dir) -> Path | None:
    """The newest complete OUT/checkpoint-STEP (half-written ones are temp folders and never match)."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("checkpoint-*")
             if (m := CHECKPOINT_RE.search(p.name)) and M.is_complete_checkpoint(p)
             and (p / TRAINER_STATE).exists()]
    return max(found)[1] if found else None


# ---- metrics: the log, the trackers, the curves ----


class MetricsLog:
    """OUT/metrics.jsonl, one JSON object per optimizer step, each row also sent to the tracker that
    --report-to names (`Tracker`). On resume, rows past the resumed step (written after the last
    checkpoint by the run that died) are dropped so the file reads as one run. `close()` at the end."""

    def __init__(self, out_dir, enabled: bool, resume_step: int = 0, report_to: str = "none"):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tracker = None
        if enabled:
            rows = self.read(self.path) if resume_step else []
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= resume_step))
            if report_to != "none":
                self.tracker = Tracker(report_to, out_dir, resume_step)

    @staticmethod
    def read(path) -> list[dict]:
        rows = []
        for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut short by a kill
        return rows

    def log(self, row: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            self.tracker.log(row)

    def close(self):
        if self.tracker is not None:
            self.tracker.close()


TRACKERS = ("tensorboard", "wandb")  # what --report-to can send a run's metrics to; each is its package's name


def check_tracker(report_to: str) -> None:
    """Refuse --report-to X at start-up, before anything is loaded, when X's package is not installed."""
    if report_to == "none":
        return
    try:
        importlib.import_module(report_to)
    except ImportError as e:
        raise errors.UsageError(f"--report-to {report_to}: the {report_to} package is not installed ({e}); "
                                f"install it with `pip install {report_to}`, or pass --report-to none") from None


class Tracker:
    """A run's metric rows in an experiment tracker, beside metrics.jsonl (rank 0 only):

        tensorboard   event files in OUT/tensorboard/ (tensorboard --logdir OUT/tensorboard)
        wandb         a Weights & Biases run in OUT/wandb/, named after OUT; offline (upload it later
                      with `wandb sync OUT/wandb/offline-run-*`) unless an API key is found (WANDB_API_KEY,
                      or ~/.netrc as `wandb login` writes it) or WANDB_MODE says otherwise

    Every row's numbers are logged at the row's "step", under the row's keys. The run's settings
    (OUT/settings.json, written by `start_run`) are its config: TensorBoard's hparams, wandb's config.
    A resumed TensorBoard run drops what the dead run logged past the resumed step (`purge_step`), as
    MetricsLog does; a resumed wandb run is a new wandb run of the same name.
    """

    def __init__(self, report_to: str, out_dir, resume_step: int = 0):
        out = Path(out_dir)
        config = json.loads((out / "settings.json").read_text())
        self.report_to = report_to
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
            # hparams takes numbers, strings and booleans (None is left out): lists go as their text
            config = {k: v if v is None or isinstance(v, (int, float, str, bool)) else json.dumps(v)
                      for k, v in config.items()}
            for summary in hparams(config, metric_dict={}):  # experiment, session start, session end
                self.writer.file_writer.add_summary(summary)
        else:
            import wandb
            self.run = wandb.init(dir=str(out), name=out.name, config=config,
                                  mode=os.environ.get("WANDB_MODE") or ("online" if _wandb_key_found() else "offline"))

    def log(self, row: dict):
        step = row["step"]
        scalars = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.report_to == "tensorboard":
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()  # on disk now, as metrics.jsonl is: a killed run keeps what it logged
        else:
            self.run.log(scalars, step=step)

    def close(self):
        if self.report_to == "tensorboard":
            self.writer.close()
        else:
            self.run.finish()


def _wandb_key_found() -> bool:
    """Whether wandb can upload without asking: WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def plot_metrics(metrics_path, keys: list[str], png_path, title: str):
    """A PNG with one panel per metric against the step, four panels a row. A key ending in "*" (e.g.
    "accuracy_*") draws every metric that starts with it in one panel, each as its rolling mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = MetricsLog.read(metrics_path)
    present = sorted({k for r in rows for k in r})
    panels = []  # (title, keys drawn in it)
    for key in keys:
        if key.endswith("*"):  # "accuracy_*": one panel, a smoothed line per matching key
            matching = [k for k in present if k.startswith(key[:-1])]
            if matching:
                panels.append((key[:-1].rstrip("_") + " by " + "/".join(k[len(key) - 1:] for k in matching)
                               if len(matching) <= 4 else key, matching))
        elif key in present:
            panels.append((key, [key]))
    if not panels:
        return
    n_cols = min(4, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 3 * n_rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (panel_title, panel_keys) in zip(axes.flat, panels):
        for key in panel_keys:
            steps, values = zip(*[(r["step"], r[key]) for r in rows if key in r])
            window = max(1, len(values) // 8)  # a rolling mean: one RL step's batch is a noisy sample
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            if len(panel_keys) == 1:
                ax.plot(steps, values, marker=".", alpha=0.35, label="per step")
                ax.plot(steps[window - 1:], smooth, label=f"mean of {window}")
            else:
                ax.plot(steps[window - 1:], smooth, label=f"{key} (mean of {window})")
        ax.set_xlabel("step")
        ax.set_title(panel_title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    # fixed margins (inches): matplotlib's tight_layout measured every label and took ~0.8 s of a ~2 s plot
    width, height = 4 * n_cols, 3 * n_rows
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.2 / width, bottom=0.55 / height, top=1 - 0.6 / height,
                        wspace=0.3, hspace=0.6)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
