"""TrainConfig: defaults are valid, every problem is listed in one error."""
from __future__ import annotations

import pytest

from loraplex.server.errors import ConfigError
from loraplex.training.config import TrainConfig, parse_target_modules


def test_defaults_are_valid():
    cfg = TrainConfig(data="d.jsonl", out="o")
    assert cfg.all_linear and cfg.r == 16 and cfg.alpha == 32 and not cfg.qlora
    assert cfg.to_dict()["target_modules"] == ["all-linear"]


def test_every_problem_is_listed():
    with pytest.raises(ConfigError) as info:
        TrainConfig(r=0, alpha=-1, dropout=1.0, target_modules=("all-linear", "q_proj"), learning_rate=0,
                    batch_size=0, max_length=4, eval_split=1.5, precision="fp8", device="tpu", optim="sgd")
    message = str(info.value)
    for needle in ("data:", "out:", "r=0", "alpha=-1", "dropout=1.0", "'all-linear' cannot be combined",
                   "learning_rate=0", "batch_size=0", "max_length=4", "eval_split=1.5", "precision='fp8'",
                   "device='tpu'", "optim='sgd'"):
        assert needle in message, needle


def test_cpu_refuses_gpu_only_settings():
    with pytest.raises(ConfigError, match="paged_adamw_8bit.*needs a GPU"):
        TrainConfig(data="d", out="o", device="cpu", optim="paged_adamw_8bit")
    with pytest.raises(ConfigError, match="bf16.*needs a GPU"):
        TrainConfig(data="d", out="o", device="cpu", precision="bf16")


def test_target_modules():
    assert parse_target_modules("q_proj, v_proj,") == ("q_proj", "v_proj")
    assert parse_target_modules("all-linear") == ("all-linear",)
    with pytest.raises(ConfigError, match="not module names"):
        TrainConfig(data="d", out="o", target_modules=("q_proj", "v proj!"))
    with pytest.raises(ConfigError, match="duplicates"):
        TrainConfig(data="d", out="o", target_modules=("q_proj", "q_proj"))
    with pytest.raises(ConfigError, match="non-empty"):
        TrainConfig(data="d", out="o", target_modules=())
