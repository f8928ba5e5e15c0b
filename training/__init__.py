"""loraplex training: LoRA / QLoRA adapters from JSONL."""
