"""`loraplex train --sweep sweep.toml`: a grid of runs, ranked by eval loss, with a plot of the loss curves.

    [train]                      # any TrainConfig field; flags given on the command line override these
    data = "examples/data/qa.jsonl"
    max_steps = 40

    [grid]                       # every combination is one run (TrainConfig fields, lists of values)
    r = [4, 8, 16]
    alpha = [16, 32]
    target_modules = ["q_proj,v_proj", "all-linear"]
    learning_rate = [1e-4, 2e-4]

Runs go to OUT/<run name>/ (a full `loraplex train` output each); OUT/sweep.csv and OUT/sweep.md rank
them by final eval loss, OUT/loss_curves.png draws them. A run whose train_summary.json exists is
reused and one with checkpoints but no summary resumes, so an interrupted sweep continues where it stopped. Paths in the file are relative to it.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from loraplex.server.errors import ConfigError, LoraplexError

from .config import TrainConfig, parse_target_modules

NOT_IN_GRID = ("data", "out", "eval_data", "base", "resume")
PATH_FIELDS = ("data", "eval_data", "base")


def load_sweep(path: Path) -> tuple[dict, dict[str, list]]:
    """([train] table, [grid] table) with values checked against TrainConfig's fields."""
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    unknown_tables = sorted(set(doc) - {"train", "grid"})
    train, grid = doc.get("train", {}), doc.get("grid", {})
    problems = [f"unknown table [{t}] (expected [train] and [grid])" for t in unknown_tables]
    fields = TrainConfig.field_names()
    problems += [f"[train] {k}: not a train setting" for k in train if k not in fields]
    problems += [f"[grid] {k}: not a train setting" for k in grid if k not in fields]
    problems += [f"[grid] {k}: cannot be swept" for k in grid if k in NOT_IN_GRID]
    problems += [f"[grid] {k}: expected a non-empty list of values" for k, v in grid.items()
                 if not isinstance(v, list) or not v]
    if not grid:
        problems.append("[grid] is empty: nothing to sweep")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    for key in PATH_FIELDS:
        if isinstance(train.get(key), str):
            train[key] = str((path.parent / train[key]).resolve()) if not Path(train[key]).is_absolute() \
                else train[key]
    return _typed(train), {k: [_typed({k: v})[k] for v in values] for k, values in grid.items()}


def _typed(values: dict) -> dict:
    """TOML -> TrainConfig types: target_modules as a tuple (from "a,b" or ["a", "b"])."""
    out = dict(values)
    if "target_modules" in out:
        value = out["target_modules"]
        out["target_modules"] = parse_target_modules(value) if isinstance(value, str) else tuple(value)
    return out


def run_name(index: int, point: dict) -> str:
    parts = []
    for key, value in point.items():
        text = "+".join(value) if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={text}")
    return f"run{index:02d}-" + "-".join(parts).replace("/", "_").replace(",", "+")


def plan_runs(path: Path, args: argparse.Namespace) -> list[tuple[str, dict, TrainConfig]]:
    """Every grid point as a validated TrainConfig (all checked before anything trains)."""
    from .cli import TRAIN_FLAGS

    train, grid = load_sweep(path)
    if not args.out:
        raise ConfigError("--sweep needs --out DIR (the sweep's folder)")
    flags = {dest: getattr(args, dest) for dest, _ in TRAIN_FLAGS.values() if getattr(args, dest, None) is not None}
    swept_flags = sorted(set(flags) & set(grid))
    if swept_flags:
        raise ConfigError(f"{', '.join(swept_flags)}: set on the command line and swept in {path}")
    runs, problems = [], []
    for index, combo in enumerate(itertools.product(*grid.values())):
        point = dict(zip(grid, combo))
        name = run_name(index, point)
        values = {**train, **flags, **point, "out": str(Path(args.out) / name), "resume": None}
        try:
            cfg = TrainConfig(**values)
        except ConfigError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if cfg.eval_data is None and cfg.eval_split <= 0:
            problems.append(f"{name}: a sweep ranks by eval loss: set eval_data or eval_split > 0")
        runs.append((name, point, cfg))
    if problems:
        raise ConfigError("; ".join(problems))
    return runs


def run_sweep(path: Path, args: argparse.Namespace, say=print) -> list[dict]:
    from .train import train

    runs = plan_runs(path, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"sweep: {len(runs)} runs into {out}")
    rows = []
    for i, (name, point, cfg) in enumerate(runs, start=1):
        summary_file = Path(cfg.out) / "train_summary.json"
        if summary_file.is_file():
            say(f"[{i}/{len(runs)}] {name}: done earlier, reused")
            summary, error = json.loads(summary_file.read_text()), None
        else:
            if _has_checkpoint(Path(cfg.out)):  # stopped mid-run: continue that run
                cfg = dataclasses.replace(cfg, resume="latest")
            say(f"[{i}/{len(runs)}] {name}" + (" (resuming)" if cfg.resume else ""))
            try:
                summary, error = train(cfg, say=lambda line: say(f"  {line}")).summary, None
            except LoraplexError as exc:
                raise ConfigError(f"sweep run {name}: {exc}") from None
            except RuntimeError as exc:  # out of memory and the like: record it, keep sweeping
                summary, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                say(f"  failed: {error}")
        rows.append(_row(name, point, summary, error))
    ranked = rank(rows)
    write_tables(out, ranked, list(runs[0][1]))
    plot_curves(out / "loss_curves.png", [(r["run"], r["_summary"]) for r in ranked if r["_summary"]])
    best = ranked[0]
    say(f"best: {best['run']} (eval loss {best['eval_loss']}); table {out / 'sweep.md'}, plot {out / 'loss_curves.png'}")
    return ranked


def _has_checkpoint(out: Path) -> bool:
    from transformers.trainer_utils import get_last_checkpoint

    return (out / "checkpoints").is_dir() and get_last_checkpoint(str(out / "checkpoints")) is not None


def _row(name: str, point: dict, summary: dict | None, error: str | None) -> dict:
    m = (summary or {}).get("metrics", {})
    row = {"run": name, **{k: ",".join(v) if isinstance(v, tuple) else v for k, v in point.items()},
           "eval_loss": m.get("eval_loss_after"), "eval_perplexity": m.get("eval_perplexity_after"),
           "eval_loss_before": m.get("eval_loss_before"), "train_loss_last": m.get("train_loss_last"),
           "steps": m.get("steps"), "train_seconds": m.get("train_seconds"),
           "tokens_per_second": m.get("tokens_per_second"), "error": error or "", "_summary": summary}
    return row


def rank(rows: list[dict]) -> list[dict]:
    """Lowest eval loss first; runs without one (failed) last, in grid order."""
    ordered = sorted(rows, key=lambda r: (r["eval_loss"] is None, r["eval_loss"] or 0.0))
    return [{"rank": i, **r} for i, r in enumerate(ordered, start=1)]


def write_tables(out: Path, ranked: list[dict], grid_keys: list[str]) -> None:
    columns = ["rank", "run", *grid_keys, "eval_loss", "eval_perplexity", "eval_loss_before", "train_loss_last",
               "steps", "train_seconds", "tokens_per_second", "error"]
    with open(out / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(ranked)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in ranked:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def plot_curves(path: Path, runs: list[tuple[str, dict]]) -> None:
    """Training loss (lines) and eval loss (markers) against step, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5.5), dpi=110)
    for i, (name, summary) in enumerate(runs):
        colour = f"C{i % 10}"
        steps, losses = zip(*summary["loss_curve"]) if summary["loss_curve"] else ((), ())
        ax.plot(steps, losses, color=colour, linewidth=1.3, label=name)
        if summary["eval_curve"]:
            eval_steps, eval_losses = zip(*summary["eval_curve"])
            ax.plot(eval_steps, eval_losses, color=colour, linestyle="--", marker="o", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (lines: train, dashed + dots: eval)")
    ax.set_title("loraplex sweep: loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: never over a curve
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
