"""Write examples/data/qa_base.jsonl: the questions of examples/base_questions.py with the base model's own answers.

The answers come from the embedded base model itself (its fp32 weights, greedy, with transformers' batched
`generate` on CPU: our engine took over 15 minutes for these on 2 cores; nothing downloaded), cut to their first
sentence or two. A question with an expected word is dropped when the base's answer lacks it, so
`caps` is trained to restyle what the base knows, never taught a fact. Deterministic; a few minutes on 2 CPU cores.

    python examples/make_base_answers.py

Not used by the committed adapters yet. Measured 2026-12-02 on the 18 held-out questions (NF4 base, greedy): caps
trained on qa.jsonl + these 210 rows kept 2 facts (r16 all-linear, lr 1e-3, 3 epochs; the committed caps keeps 1),
but its 0.5/0.5 mix with pirate lost Paris (THE CAPITAL OF FRANCE IS CITY OF BEAK); r16 on q/k/v/o (lr 2e-3, 3
epochs) kept 2 and lost Paris on the demo question itself. Both write fluent ALL CAPS with wrong names (ENGLAND ->
BERLIN, DENMARK -> BEDFIJ): at 135M parameters the base's facts live in its cased tokens (Rome), and restyled
data alone did not teach the adapter to spell them in capitals (ROME is other tokens).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base_questions import questions  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from loraplex.server.model.embedded import embedded_model_dir  # noqa: E402

OUT = Path(__file__).resolve().parent / "data" / "qa_base.jsonl"
MAX_WORDS = 30
BATCH = 32


def first_sentences(text: str) -> str | None:
    """The answer's first sentence, plus the second while under MAX_WORDS words; None if no sentence ends."""
    sentences = re.findall(r"[^.!?]*[.!?]+(?=\s|$)", text.strip())
    kept = []
    for sentence in sentences:
        sentence = sentence.strip()
        if kept and len(" ".join([*kept, sentence]).split()) > MAX_WORDS:
            break
        kept.append(sentence)
        if len(kept) == 2:
            break
    answer = " ".join(kept)
    return answer if answer and len(answer.split()) <= 2 * MAX_WORDS else None


def answers(asked: list[str]) -> list[str]:
    """The base's greedy answers (at most 64 new tokens) to each question as a user turn."""
    folder = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    texts = []
    for start in range(0, len(asked), BATCH):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                 add_generation_prompt=True) for q in asked[start:start + BATCH]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"{len(texts)}/{len(asked)} answered", flush=True)
    return texts


def main() -> int:
    asked = questions()
    results = answers([q for q, _ in asked])
    rows, dropped = [], []
    for (question, fact), result in zip(asked, results):
        answer = first_sentences(result)
        if answer is None or (fact is not None and fact.lower() not in answer.lower()):
            dropped.append(f"{question} -> {result.strip()[:80]!r}")
            continue
        rows.append({"instruction": question, "output": answer})
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{OUT}: {len(rows)} rows; dropped {len(dropped)} (wrong or unfinished):")
    print("\n".join("  " + d for d in dropped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
