"""The model card (README.md beside the adapter): what base, what data, which settings, what came out."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

from loraplex.server.hashing import file_sha256

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def folder_weights_sha256(folder: Path) -> str:
    """One hash for a model's weights: sha256 over 'name sha256' lines of its weight files, sorted."""
    lines = [f"{p.name} {file_sha256(p)}\n" for p in sorted(Path(folder).iterdir())
             if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def render_card(summary: dict) -> str:
    base, data, metrics, hp = summary["base"], summary["data"], summary["metrics"], summary["hyperparameters"]
    tags = ["lora", "loraplex"] + (["qlora"] if hp["qlora"] else [])
    lines = ["---", "library_name: peft", f"base_model: {base['id']}", "tags:"] + [f"- {t}" for t in tags] + [
        "---", "", f"# {summary['name']}", "",
        f"A LoRA adapter for `{base['id']}`, trained by `loraplex train` "
        f"({'QLoRA on an NF4 base' if hp['qlora'] else 'LoRA on a ' + base['dtype'] + ' base'}).", "",
        "## Base model", "",
        "| | |", "|---|---|",
        f"| id | `{base['id']}` |",
        f"| folder | `{base['path']}` |",
        f"| config.json sha256 | `{base['config_sha256']}` |",
        f"| weights sha256 | `{base['weights_sha256']}` |",
        f"| architecture | {base['model_type']}, {base['num_layers']} layers, hidden {base['hidden_size']} |",
        "", "## Data", "",
        "| split | file | sha256 | form | examples | tokens (trained) | cut / dropped |",
        "|---|---|---|---|---|---|---|"]
    for split in ("train", "eval"):
        d = data.get(split)
        if d:
            lines.append(f"| {split} | `{d['path']}`{' (held out)' if d.get('held_out') else ''} | "
                         f"`{d['sha256']}` | {d['form']} | {d['examples']} | {d['tokens']:,} "
                         f"({d['trained_tokens']:,}) | {d['truncated']} / {d['dropped']} |")
    if data.get("packing"):
        p = data["packing"]
        lines += ["", f"Packed into {p['rows']} rows of {p['row_length']} tokens ({p['fill']:.0%} full); "
                      "attention never crosses examples."]
    lines += ["", "## Hyper-parameters", "", "| | |", "|---|---|"]
    for key in ("r", "alpha", "rslora", "dropout", "target_modules", "learning_rate", "lr_scheduler", "warmup",
                "weight_decay", "epochs", "max_steps", "batch_size", "grad_accum", "max_length", "packing",
                "gradient_checkpointing", "chunked_loss", "seed", "optim", "precision"):
        value = hp.get(key)
        text = ", ".join(value) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) else value
        lines.append(f"| {key} | {text} |")
    lines.append(f"| processes | {hp.get('world_size', 1)} ({hp.get('device', '?')}) |")
    lines += ["", "## Metrics", "", "| | |", "|---|---|",
              f"| steps | {metrics['steps']} ({_fmt(metrics['epochs'], 2)} epochs) |",
              f"| train loss, first / last log | {_fmt(metrics['train_loss_first'])} / "
              f"{_fmt(metrics['train_loss_last'])} |",
              f"| eval loss, before / after | {_fmt(metrics['eval_loss_before'])} / "
              f"{_fmt(metrics['eval_loss_after'])} |",
              f"| eval perplexity, before / after | {_fmt(metrics['eval_perplexity_before'], 2)} / "
              f"{_fmt(metrics['eval_perplexity_after'], 2)} |",
              f"| tokens seen | {metrics['tokens']:,} |",
              f"| training time | {metrics['train_seconds']:.1f} s ({metrics['tokens_per_second']:,.0f} tokens/s) |",
              f"| trainable parameters | {metrics['trainable_parameters']:,} |",
              "", "## Use", "", "```bash",
              f"loraplex adapters register {summary['name']} {summary['out']}",
              "```", "", "```python", "from peft import PeftModel",
              f"model = PeftModel.from_pretrained(base, \"{summary['out']}\")", "```", "",
              f"Versions: {', '.join(f'{k} {v}' for k, v in summary['versions'].items())}.", ""]
    return "\n".join(lines)


def write_card(out: Path, summary: dict) -> Path:
    path = Path(out) / "README.md"
    path.write_text(render_card(summary))
    return path
