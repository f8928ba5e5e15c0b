"""Several processes (GPUs) through `accelerate launch`: DDP by default, FSDP with --fsdp.

`loraplex train --num-processes N ...` writes OUT/accelerate_config.json and re-runs the same
training as `python -m accelerate.commands.launch --config_file ... -m loraplex.training ...`; each
process trains on its share of every batch, rank 0 writes the adapter and the card. On a machine
without GPUs the same path runs N CPU processes over gloo (how the tests check it).

FSDP + QLoRA (documented, not tested here): --fsdp with --qlora stores the NF4 weights as bf16
(bnb_4bit_quant_storage) so FSDP can shard them with the bf16 LoRA weights, loads the base on rank 0
only (fsdp_cpu_ram_efficient_loading) and wraps each decoder layer (TRANSFORMER_BASED_WRAP). Use
bf16, gradient checkpointing, and plain AdamW (paged 8-bit optimizers do not shard).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def under_launcher() -> bool:
    """True inside a process started by accelerate / torchrun."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_config(num_processes: int, fsdp: bool = False, port: int | None = None) -> dict:
    """An accelerate config (the JSON form of `accelerate config`'s YAML) for one machine."""
    config = {
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP" if fsdp else "MULTI_GPU",
        "num_processes": num_processes, "num_machines": 1, "machine_rank": 0, "gpu_ids": "all",
        "main_process_ip": "127.0.0.1", "main_process_port": port or free_port(), "rdzv_backend": "static",
        "same_network": True, "mixed_precision": "no",  # Trainer's own bf16 setting decides
        "downcast_bf16": "no", "use_cpu": False, "main_training_function": "main",
    }
    if fsdp:
        config["fsdp_config"] = {
            "fsdp_version": 1, "fsdp_sharding_strategy": "FULL_SHARD",
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_cpu_ram_efficient_loading": True, "fsdp_sync_module_states": True,
            "fsdp_forward_prefetch": False, "fsdp_offload_params": False,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_use_orig_params": False,
        }
    return config


def launch_command(config_file: Path, train_argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "-m", "loraplex.training", *train_argv]


def launch(train_argv: list[str], num_processes: int, fsdp: bool, out: Path, say=print) -> int:
    """Write the accelerate config into `out` and run the training under it; the launcher's exit code."""
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "accelerate_config.json"
    config_file.write_text(json.dumps(accelerate_config(num_processes, fsdp), indent=2))
    command = launch_command(config_file, train_argv)
    say(f"launching {num_processes} processes ({'FSDP' if fsdp else 'DDP'}): {' '.join(command)}")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, env=env).returncode
