"""Several processes through accelerate launch: the config accelerate reads, and a real 2-process DDP run on the CPU."""
from __future__ import annotations

import argparse
import json

import pytest

from loraplex.training.cli import add_train_parser, run_train
from loraplex.training.launch import accelerate_config, launch_command

from .conftest import caps_chat, write_jsonl


@pytest.mark.parametrize("fsdp", [False, True])
def test_accelerate_reads_the_generated_config(tmp_path, fsdp):
    from accelerate.commands.config.config_args import load_config_from_file

    path = tmp_path / "accelerate_config.json"
    path.write_text(json.dumps(accelerate_config(4, fsdp=fsdp, port=29555)))
    config = load_config_from_file(str(path))
    assert config.num_processes == 4 and config.main_process_port == 29555
    assert config.distributed_type.value == ("FSDP" if fsdp else "MULTI_GPU")
    if fsdp:
        assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    command = launch_command(path, ["--data", "d"])
    assert command[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert command[-4:] == ["-m", "loraplex.training", "--data", "d"]


def test_two_cpu_processes_train_one_adapter(tmp_path, tiny_base, capfd):
    """DDP over gloo: each process takes its share of every batch; rank 0 writes the adapter and card."""
    data = write_jsonl(tmp_path / "d.jsonl", caps_chat(16))
    out = tmp_path / "ddp"
    parser = argparse.ArgumentParser(prog="loraplex")
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--data", str(data), "--out", str(out), "--base", str(tiny_base),
                              "--device", "cpu", "--num-processes", "2", "--max-steps", "2", "--batch-size", "2",
                              "--max-length", "64", "--r", "2", "--target-modules", "q_proj,v_proj",
                              "--save-steps", "0", "--no-tensorboard", "--no-progress", "--eval-split", "0.25"])
    assert run_train(args) == 0, capfd.readouterr().err[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["hyperparameters"]["world_size"] == 2
    assert summary["hyperparameters"]["effective_batch"] == 4
    assert summary["metrics"]["steps"] == 2 and summary["metrics"]["eval_loss_after"] is not None
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    assert json.loads((out / "accelerate_config.json").read_text())["num_processes"] == 2
    printed = capfd.readouterr().out
    assert printed.count("done: 2 steps") == 1  # the summary comes from rank 0 only
