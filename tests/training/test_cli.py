"""`loraplex train` flags: mapping to TrainConfig, one-line errors without tracebacks, --register checks."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from loraplex.training.cli import add_train_parser, config_from_args, run_train, train_argv

from .conftest import write_jsonl


def parse(argv: list[str]) -> argparse.Namespace:
    """The way the `loraplex` entry point wires the subcommand."""
    parser = argparse.ArgumentParser(prog="loraplex")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["train", *argv])


def test_flags_map_to_the_config_and_back():
    argv = ["--data", "d.jsonl", "--out", "o", "--qlora", "--r", "8", "--alpha", "16", "--target-modules",
            "q_proj,v_proj", "--lr", "1e-4", "--max-steps", "50", "--packing", "--rslora", "--dropout", "0.1",
            "--grad-accum", "4", "--batch-size", "2", "--max-length", "512", "--gradient-checkpointing",
            "--no-chunked-loss", "--resume", "--seed", "3", "--eval-split", "0.2", "--no-tensorboard"]
    args = parse(argv)
    cfg = config_from_args(args)
    assert (cfg.qlora, cfg.r, cfg.alpha, cfg.target_modules, cfg.learning_rate, cfg.max_steps) == (
        True, 8, 16.0, ("q_proj", "v_proj"), 1e-4, 50)
    assert cfg.packing and cfg.rslora and cfg.gradient_checkpointing and not cfg.chunked_loss
    assert (cfg.resume, cfg.seed, cfg.eval_split, cfg.tensorboard, cfg.grad_accum) == ("latest", 3, 0.2, False, 4)
    assert cfg.epochs == 3.0 and cfg.warmup == 0.03  # untouched flags keep TrainConfig's defaults
    assert config_from_args(parse(train_argv(args))) == cfg  # what the launched processes receive


def test_help_lists_the_contract_flags():
    parser = argparse.ArgumentParser(prog="loraplex")
    train = add_train_parser(parser.add_subparsers(dest="command"))
    text = train.format_help()
    for flag in ("--data", "--out", "--base", "--qlora", "--r", "--alpha", "--target-modules", "--eval-data",
                 "--register", "--sweep", "--resume", "--seed", "--lr", "--epochs", "--max-steps", "--batch-size",
                 "--grad-accum", "--max-length", "--packing", "--gradient-checkpointing", "--rslora", "--dropout",
                 "--num-processes", "--fsdp"):
        assert flag in text, flag


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("loraplex train: error: ")
    return err[0]


def test_register_flags_are_checked_before_training(capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    assert run_train(parse(["--data", str(data), "--out", "o", "--register", "bad name"])) == 2
    assert "--register 'bad name'" in one_error_line(capsys)
    assert run_train(parse(["--data", str(data), "--out", "o", "--register", "legal", "--server", "nohost"])) == 2
    assert "--server 'nohost': expected HOST:PORT" in one_error_line(capsys)
    assert run_train(parse(["--data", str(data), "--out", "o", "--server", "h:1"])) == 2
    assert "--server is only used with --register" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()  # refused before any training


def test_register_refuses_a_name_the_server_would_refuse_before_training(capsys, tmp_path):
    """The server takes names of at most 64 characters (server/adapters/names.py); so does --register."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    out = tmp_path / "o"
    assert run_train(parse(["--data", str(data), "--out", str(out), "--register", "n" * 65])) == 2
    line = one_error_line(capsys)
    assert "is not a valid adapter name (1-64 letters" in line and "65 characters" in line, line
    assert not out.exists()


def test_register_uploads_the_trained_adapter_to_a_running_server(capsys, tmp_path, tiny_base):
    """A real server on the same (tiny) base: train 2 steps with --register, the adapter is served."""
    from loraplex.server.config import ModelConfig, ServiceConfig
    from loraplex.server.model.loader import load_model
    from loraplex.client import Client, ClientConfig
    from loraplex.v1 import adapters_pb2, generation_pb2

    from ..service.conftest import ServerThread, engine_config_for_tests

    loaded = load_model(ModelConfig(path=str(tiny_base), quantization="none", dtype="float32"))
    service = ServiceConfig(port=0, metrics_port=None, state_dir=str(tmp_path / "state"),
                            admin_tokens=("s3cret",))
    server = ServerThread(service, engine_config_for_tests(tmp_path / "cache"), loaded)
    try:
        data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello there general kenobi"}] * 4)
        argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--base", str(tiny_base), "--r", "4",
                "--target-modules", "q_proj,v_proj", "--max-steps", "2", "--batch-size", "2", "--no-progress",
                "--no-tensorboard", "--register", "tiny-adapter", "--server", server.target]
        assert run_train(parse(argv)) == 2  # no admin token: refused, the adapter is kept on disk
        assert "UNAUTHENTICATED" in one_error_line(capsys)
        assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
        token = tmp_path / "token"
        token.write_text("s3cret\n")
        assert run_train(parse([*argv, "--overwrite", "--token-file", str(token)])) == 0
        assert "registered 'tiny-adapter' version 1" in capsys.readouterr().out
        with Client(ClientConfig(target=server.target, token="s3cret")) as client:
            info = client.stubs.adapters.GetAdapter(adapters_pb2.GetAdapterRequest(name="tiny-adapter"),
                                              metadata=client.config.metadata)
            assert info.adapter.rank == 4
            reply = client.stubs.generation.Generate(generation_pb2.GenerateRequest(
                prompt="hello", adapter="tiny-adapter",
                stopping=generation_pb2.StoppingCriteria(max_new_tokens=3, ignore_eos=True)))
            assert len(reply.token_ids) == 3 and reply.adapter_version == "tiny-adapter@1"
    finally:
        server.stop()


def test_resume_and_earlier_checkpoints(capsys, tmp_path, tiny_base):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello there"}])
    out = tmp_path / "o"
    common = ["--data", str(data), "--out", str(out), "--base", str(tiny_base), "--device", "cpu"]
    assert run_train(parse([*common, "--resume"])) == 2
    assert "--resume: no checkpoint in" in one_error_line(capsys)
    (out / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-5" / "trainer_state.json").write_text("{}")
    assert run_train(parse(common)) == 2
    assert "holds checkpoints of an earlier run: add --resume" in one_error_line(capsys)
    assert run_train(parse([*common, "--resume", str(tmp_path / "nope")])) == 2
    assert "not a checkpoint folder" in one_error_line(capsys)


def test_bad_config_is_one_line(capsys, tmp_path):
    assert run_train(parse(["--out", "o", "--r", "0", "--dropout", "1.5"])) == 2
    line = one_error_line(capsys)
    assert "data: a training JSONL file is required" in line and "r=0" in line and "dropout=1.5" in line
    assert run_train(parse(["--data", "d", "--out", "o", "--fsdp"])) == 2
    assert "--fsdp shards over several processes" in one_error_line(capsys)


@pytest.mark.parametrize("content, expected", [
    ("", "bad.jsonl: no examples (the file is empty)"),
    ('{"instruction": "q", "output": "a"}\n{"instruction": "q2"}\n', "bad.jsonl:2: key 'output': missing"),
    ('{"messages": [{"role": "user", "content": "' + "word " * 200 + '"}, {"role": "assistant", "content": "k"}]}\n',
     "every example lost all its trained tokens to truncation at max_length=32"),
])
def test_bad_data_is_one_line(capsys, tmp_path, content, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    assert run_train(parse(["--data", str(bad), "--out", str(tmp_path / "o"), "--device", "cpu",
                            "--max-length", "32"])) == 2
    assert expected in one_error_line(capsys)


def test_bad_data_from_the_command_line_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"\n')
    proc = subprocess.run([sys.executable, "-m", "loraplex.training", "--data", str(bad), "--out",
                           str(tmp_path / "o"), "--device", "cpu"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"loraplex train: error: {bad}:2: invalid JSON: "
                                                "Expecting ',' delimiter (column 13)"], proc.stderr
    assert "Traceback" not in proc.stdout
