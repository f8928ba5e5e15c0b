"""Train the two example adapters the demo serves: `caps` (answers in ALL CAPS) and `pirate` (a pirate voice).

Both are LoRA r=8 on the embedded SmolLM2-135M-Instruct, trained on examples/data/qa.jsonl with the
answers rewritten, loss on the assistant tokens only. Deterministic (seeded); ~1-2 minutes on 2 CPU cores:

    .venv/bin/python examples/make_example_adapters.py
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
PIRATE_WORDS = {"you": "ye", "your": "yer", "the": "th'", "is": "be", "are": "be", "my": "me", "hello": "ahoy",
                "friend": "matey", "yes": "aye", "of": "o'", "and": "an'", "for": "fer", "to": "t'"}


def pirate(text: str) -> str:
    def swap(match: re.Match) -> str:
        word = match.group(0)
        new = PIRATE_WORDS.get(word.lower())
        if new is None:
            return word
        return new.capitalize() if word[0].isupper() else new
    return "Arr! " + re.sub(r"[A-Za-z]+", swap, text) + " Yo ho ho!"


STYLES = {"caps": str.upper, "pirate": pirate}


def examples(style: str) -> list[list[dict]]:
    rows = [json.loads(line) for line in (HERE / "data" / "qa.jsonl").read_text().splitlines() if line.strip()]
    return [[{"role": "user", "content": r["instruction"]},
             {"role": "assistant", "content": STYLES[style](r["output"])}] for r in rows]


def encode(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside the assistant answer)."""
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt).input_ids
    ids = tokenizer(full).input_ids
    return ids, [-100] * len(prompt_ids) + ids[len(prompt_ids):]


def train(style: str, model_dir: Path, out: Path, epochs: int = 12, lr: float = 2e-3, batch: int = 8) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, config)
    data = [encode(tokenizer, m) for m in examples(style)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(0)
    loss_value = float("nan")
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=gen).tolist()
        for start in range(0, len(order), batch):
            rows = [data[i] for i in order[start:start + batch]]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.tensor([i + [tokenizer.pad_token_id or 0] * (width - len(i)) for i, _ in rows])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss_value = loss.item()
        print(f"{style}: epoch {epoch + 1}/{epochs} loss {loss_value:.3f}", flush=True)
    model.save_pretrained(str(out), safe_serialization=True)
    return loss_value


def main() -> int:
    from loraplex.server.model.embedded import embedded_model_dir

    model_dir = embedded_model_dir()
    for style in sys.argv[1:] or list(STYLES):
        train(style, model_dir, HERE / "adapters" / style)
    return 0


if __name__ == "__main__":
    sys.exit(main())
