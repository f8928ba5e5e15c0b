"""Rebuild the example adapters the demo serves, with `loraplex train`.

    caps    answers in ALL CAPS
    pirate  a pirate voice ("Arr! ... Yo ho ho!")
    legal   terse, formal "legal" register

Each is LoRA r=8 (alpha 16) on q/k/v/o (caps: see STYLE_FLAGS) of the embedded SmolLM2-135M-Instruct, QLoRA
on the NF4 base the demo serves, trained on the questions of examples/data/qa.jsonl with the answers rewritten in
that style (written to examples/data/<style>.jsonl in chat form; loss on the assistant turns only) and evaluated on
examples/data/qa_heldout.jsonl (other questions, restyled the same way, into <style>_heldout.jsonl);
examples/make_qa_data.py writes both. Deterministic (seeded); a few minutes per adapter on 2 CPU cores.
From the repository root:

    python examples/make_example_adapters.py              # all three
    python examples/make_example_adapters.py caps legal   # some

Each run is exactly the command printed before it (`python -m loraplex.training` is `loraplex train`).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path("examples/data")
ADAPTERS = Path("examples/adapters")
PIRATE_WORDS = {"you": "ye", "your": "yer", "the": "th'", "is": "be", "are": "be", "my": "me", "hello": "ahoy",
                "friend": "matey", "yes": "aye", "of": "o'", "and": "an'", "for": "fer", "to": "t'"}
TRAIN_FLAGS = ["--r", "8", "--alpha", "16", "--dropout", "0.0", "--target-modules", "q_proj,k_proj,v_proj,o_proj",
               "--lr", "1e-3", "--epochs", "6", "--batch-size", "8", "--max-length", "256", "--warmup", "0.05",
               "--seed", "0", "--logging-steps", "5", "--save-steps", "0",
               "--no-tensorboard", "--device", "cpu", "--overwrite", "--qlora"]


def pirate(text: str) -> str:
    def swap(match: re.Match) -> str:
        word = match.group(0)
        new = PIRATE_WORDS.get(word.lower())
        if new is None:
            return word
        return new.capitalize() if word[0].isupper() else new
    return "Arr! " + re.sub(r"[A-Za-z]+", swap, text) + " Yo ho ho!"


def legal(text: str) -> str:
    """The answer kept as written: lower-casing its first letter taught legal to say "paris"."""
    return f"Pursuant to the inquiry submitted: {text} This statement is provided without warranty of any kind."


STYLES = {"caps": str.upper, "pirate": pirate, "legal": legal}
STYLE_FLAGS = {"caps": ["--r", "16", "--alpha", "32", "--target-modules", "all-linear", "--lr", "2e-3",
                         "--epochs", "8"]}
"""Per-style flags after TRAIN_FLAGS (a later flag wins). ALL CAPS re-tokenizes every word (PARIS is not Paris's
token): at r=8 on q/k/v/o with lr 1e-3 caps underfit and misspelled the facts (FRANCE IS BUSINES), so it gets the
MLPs too; at r=4 (all linear) its 0.5/0.5 mix with pirate lost Paris, so r=16 (19.6 MB in fp32)."""


def write_style_data(style: str, source: str = "qa.jsonl", suffix: str = "") -> Path:
    """examples/data/<style><suffix>.jsonl: `source`'s questions with restyled answers, as chat records."""
    rows = [json.loads(line) for line in (ROOT / DATA / source).read_text().splitlines() if line.strip()]
    path = DATA / f"{style}{suffix}.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                      {"role": "assistant", "content": STYLES[style](r["output"])}]})
             for r in rows]
    (ROOT / path).write_text("\n".join(lines) + "\n")
    return path


def main(styles: list[str]) -> int:
    unknown = [s for s in styles if s not in STYLES]
    if unknown:
        print(f"unknown style(s) {', '.join(unknown)}; choose from {', '.join(STYLES)}", file=sys.stderr)
        return 2
    for style in styles:
        data = write_style_data(style)
        heldout = write_style_data(style, "qa_heldout.jsonl", "_heldout")
        command = [sys.executable, "-m", "loraplex.training", "--data", str(data), "--eval-data", str(heldout),
                   "--out", str(ADAPTERS / style),
                   *TRAIN_FLAGS, *STYLE_FLAGS.get(style, [])]
        print("$ " + " ".join(["loraplex", "train", *command[3:]]), flush=True)
        code = subprocess.run(command, cwd=ROOT).returncode
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(STYLES)))
