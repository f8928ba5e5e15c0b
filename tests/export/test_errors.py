"""Bad inputs give one clear line and exit code 2, and never leave an output that looks complete."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import no_partials


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    path = dst / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return dst


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("loraplex export: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_adapter_for_another_base(cli, capsys, tiny, tmp_path, embedded_dir):
    out = tmp_path / "out"
    assert cli("merge", "--base", embedded_dir, "--adapter", tiny["a"], "--out", out) == 2
    assert "trained for a different base model" in _one_line_error(capsys)
    assert not out.exists() and no_partials(tmp_path)


def test_adapter_naming_another_base_of_the_same_shapes_warns(cli, capsys, caplog, tiny, tmp_path):
    """Shapes fit, so only the names tell: merged, with a warning printed and kept in export_info.json."""
    out = tmp_path / "out"
    assert cli("merge", "--base", tiny["base"], "--adapter", tiny["foreign"], "--out", out) == 0
    [warning] = json.loads((out / "export_info.json").read_text())["merge"]["warnings"]
    assert "other-base" in warning and "check it was trained on this base" in warning
    assert warning in caplog.text
    caplog.clear()
    assert cli("merge", "--base", tiny["other_base"], "--adapter", tiny["foreign"], "--out", tmp_path / "o2") == 0
    assert json.loads((tmp_path / "o2" / "export_info.json").read_text())["merge"]["warnings"] == []
    assert "check it was trained" not in caplog.text


def test_missing_adapter_files(cli, capsys, tiny, tmp_path):
    adapter = shutil.copytree(tiny["a"], tmp_path / "no-weights")
    (adapter / "adapter_model.safetensors").unlink()
    assert cli("merge", "--base", tiny["base"], "--adapter", adapter, "--out", tmp_path / "out") == 2
    assert "adapter_model.safetensors not found" in _one_line_error(capsys)
    assert cli("merge", "--base", tiny["base"], "--adapter", tmp_path / "nowhere", "--out", tmp_path / "out") == 2
    assert "does not exist" in _one_line_error(capsys)
    assert cli("merge", "--base", tmp_path / "no-base", "--adapter", tiny["a"], "--out", tmp_path / "out") == 2
    assert "no such folder" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_nan_weight(cli, capsys, tiny, tmp_path):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def poison(tensors):
        tensors[key][0, 0] = float("nan")

    adapter = _broken_copy(tiny["a"], tmp_path / "nan", poison)
    assert cli("merge", "--base", tiny["base"], "--adapter", adapter, "--out", tmp_path / "out") == 2
    assert "non-finite" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists() and no_partials(tmp_path)


def test_mixed_bases(cli, capsys, tiny, tmp_path):
    out = tmp_path / "out"
    assert cli("merge", "--base", tiny["base"], "--adapter", tiny["a"], "--adapter", tiny["foreign"],
               "--weights", "0.5,0.5", "--out", out) == 2
    assert "trained on different bases" in _one_line_error(capsys)
    assert not out.exists()
    assert cli("merge", "--base", tiny["base"], "--adapter", tiny["a"], "--adapter", tiny["foreign"],
               "--allow-mixed-bases", "--out", out) == 0
    assert (out / "export_info.json").is_file()


def test_unwritable_and_existing_output(cli, capsys, tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert cli("merge", "--base", tiny["base"], "--adapter", tiny["a"], "--out", blocker / "out") == 2
    assert "cannot create" in _one_line_error(capsys)
    out = tmp_path / "out"
    assert cli("merge", "--base", tiny["base"], "--adapter", tiny["a"], "--out", out) == 0
    capsys.readouterr()
    assert cli("merge", "--base", tiny["base"], "--adapter", tiny["b"], "--out", out) == 2
    assert "already exists" in _one_line_error(capsys)
    first = (out / "model.safetensors").read_bytes()
    assert cli("merge", "--base", tiny["base"], "--adapter", tiny["b"], "--out", out, "--force") == 0
    assert (out / "model.safetensors").read_bytes() != first and no_partials(tmp_path)


def test_failure_mid_write_leaves_no_output(cli, capsys, tiny, tmp_path):
    """The merge of layer 1 overflows fp32 after shards with layer 0 were written: nothing is published."""
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"

    def blow_up(tensors):  # finite weights whose product is not: 4 x 3e38 overflows fp32
        tensors[key] = torch.full_like(tensors[key], 3e38)
        tensors[key.replace("lora_B", "lora_A")] = torch.ones_like(tensors[key.replace("lora_B", "lora_A")])

    adapter = _broken_copy(tiny["a"], tmp_path / "huge", blow_up)
    out = tmp_path / "out"
    assert cli("merge", "--base", tiny["base"], "--adapter", adapter, "--out", out, "--dtype", "fp32",
               "--max-shard-mb", "0.02") == 2
    assert "not finite after the linear merge" in _one_line_error(capsys)
    assert not out.exists() and no_partials(tmp_path)


def test_bad_recipes(cli, capsys, tiny, tmp_path):
    out = tmp_path / "out"
    assert cli("merge", "--base", tiny["base"], "--adapter", tiny["a"], "--weights", "1,2", "--out", out) == 2
    assert "--weights has 2 values for 1 --adapter" in _one_line_error(capsys)
    assert cli("merge", "--base", tiny["base"], "--adapter", tiny["a"], "--density", "0.5", "--out", out) == 2
    assert "density 0.5 applies to ties/dare_* only" in _one_line_error(capsys)
    assert cli("merge", "--base", tiny["base"], "--adapter", tiny["a"], "--method", "ties", "--density", "1.5",
               "--out", out) == 2
    assert "density must be in (0, 1]" in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("job", ["merge", "onnx", "tensorrt", "run-onnx", "batch"])
def test_help_everywhere(export_parser, job, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_parser.parse_args(["export", job, "--help"])
    assert exit_info.value.code == 0
    assert "exit codes:" in capsys.readouterr().out
