"""transformers Trainer, counting real tokens, with a progress bar that shows loss, learning rate and tokens/s."""
from __future__ import annotations

import time

import torch
from transformers import Trainer, TrainerCallback


class LoraplexTrainer(Trainer):
    """Trainer + real-token counting: the collator's `num_tokens` (non-padding tokens of the micro-batch)
    is summed here and added, over every process, to state.num_input_tokens_seen at each log."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._local_tokens = 0
        self._mark: tuple[float, int] | None = None  # (time, tokens seen) at the previous training log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        num_tokens = inputs.pop("num_tokens", None)
        if num_tokens is not None and model.training:
            if self._mark is None:
                self._mark = (time.perf_counter(), self.state.num_input_tokens_seen)
            self._local_tokens = self._local_tokens + num_tokens  # a tensor: no device sync per step
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        tokens = torch.as_tensor(self._local_tokens, dtype=torch.int64, device=self.args.device)
        if self.args.world_size > 1:  # log() runs on every process at the same points: a safe collective
            tokens = self.accelerator.gather(tokens).sum()
        self.state.num_input_tokens_seen += int(tokens)
        self._local_tokens = 0
        logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
        if "loss" in logs and self._mark is not None:
            now = time.perf_counter()
            logs["tokens_per_second"] = round((self.state.num_input_tokens_seen - self._mark[1])
                                              / max(now - self._mark[0], 1e-9), 1)
            self._mark = (now, self.state.num_input_tokens_seen)
        super().log(logs, start_time)


class ProgressBar(TrainerCallback):
    """One tqdm bar on the main process: step, loss, lr, tokens/s; eval results printed above it.
    Disabled (--no-progress, logs to files): one plain line per log instead."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.enabled and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if not self.enabled and state.is_world_process_zero and ("loss" in logs or "eval_loss" in logs):
            parts = [f"step {state.global_step}/{state.max_steps}"]
            parts += [f"loss {logs['loss']:.4f}", f"lr {logs.get('learning_rate', 0):.2e}",
                      f"{logs.get('tokens_per_second', 0):,.0f} tok/s"] if "loss" in logs else []
            parts += [f"eval loss {logs['eval_loss']:.4f}"] if "eval_loss" in logs else []
            print("  ".join(parts), flush=True)
        if "loss" in logs and self.bar is not None:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}",
                                 tok_s=f"{logs.get('tokens_per_second', 0):,.0f}", refresh=False)
        if "eval_loss" in logs and self.bar is not None:
            self.bar.write(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
