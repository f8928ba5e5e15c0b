"""loraplex serving engine: one base model, many LoRA adapters per batch."""
