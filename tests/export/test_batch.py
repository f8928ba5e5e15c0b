"""export batch: several items complete, a failing item is reported and the rest go on, an interrupted
batch resumes without redoing finished outputs (proved by hashes, run counters and file times)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraplex.export.errors import ExportError
from loraplex.export.manifest import load_manifest, shard

from .conftest import no_partials


def write_manifest(path: Path, base: Path, items: list[dict], **top) -> Path:
    lines = [f'base = "{base}"', f'out = "{path.parent / "out"}"'] + [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    lines += ["[defaults]", 'exporter = "torchscript"', "validate_tokens = 4"]
    for item in items:
        lines.append("[[items]]")
        for key, value in item.items():
            if key == "adapters":
                parts = ", ".join(f'{{ path = "{p}", weight = {w} }}' for p, w in value)
                lines.append(f"adapters = [{parts}]")
            else:
                lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["items"]


@pytest.fixture
def manifest(tiny, tmp_path):
    adapter = shutil.copytree(tiny["a"], tmp_path / "a-copy")  # a test below edits it
    items = [
        {"name": "a-hf", "adapter": str(adapter), "formats": ["hf"], "dtype": "fp32"},
        {"name": "mix-ties", "adapters": [(tiny["a"], 0.6), (tiny["b"], 0.4)], "method": "ties", "density": 0.5,
         "seed": 1, "formats": ["onnx", "hf"]},
        {"name": "b-int4", "adapter": str(tiny["b"]), "formats": ["onnx-int4"]},
        {"name": "broken", "adapter": str(tmp_path / "no-such-adapter"), "formats": ["hf"]},
        {"name": "c-trt", "adapter": str(tiny["c"]), "formats": ["onnx", "tensorrt"], "max_context": 256},
    ]
    return write_manifest(tmp_path / "exports.toml", tiny["base"], items)


def test_batch_completes_reports_failures_and_resumes(cli, capsys, manifest, tmp_path):
    out = tmp_path / "out"
    assert cli("batch", manifest, "--no-progress") == 5
    captured = capsys.readouterr()
    assert "item 'broken' failed" in captured.err and "2 item(s) failed: broken, c-trt" in captured.err
    first = results(out)
    assert {k: v["status"] for k, v in first.items()} == {
        "a-hf": "done", "mix-ties": "done", "b-int4": "done", "broken": "failed", "c-trt": "failed"}
    assert "does not exist" in first["broken"]["error"] and "tensorrt is not installed" in first["c-trt"]["error"]
    record = json.loads((out / "results.json").read_text())
    assert len(record["base"]["sha256"]) == 64 and len(record["manifest_sha256"]) == 64
    ties = first["mix-ties"]
    assert [a["weight"] for a in ties["adapters"]] == [0.6, 0.4] and all(len(a["sha256"]) == 64 for a in ties["adapters"])
    assert ties["outputs"]["onnx"]["validation"]["passed"] and ties["outputs"]["hf"]["bytes"] > 0
    assert first["b-int4"]["outputs"]["onnx-int4"]["validation"]["kind"] == "int4"
    assert first["c-trt"]["outputs"]["onnx"]["runs"] == 1 and (out / "c-trt" / "onnx" / "trtexec.sh").is_file()
    for entry in (e for e in first.values() if e["status"] == "done"):
        for fmt, output in entry["outputs"].items():
            assert output["seconds"] > 0 and output["runs"] == 1 and len(output["sha256"]) == 64
            assert (out / entry["name"] / fmt / "export_info.json").is_file()
    assert not (out / "broken").exists() or not any((out / "broken").iterdir())
    times = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}

    assert cli("batch", manifest, "--no-progress") == 5  # resume: nothing finished is redone
    second = results(out)
    assert {k: v["status"] for k, v in second.items()} == {
        "a-hf": "skipped", "mix-ties": "skipped", "b-int4": "skipped", "broken": "failed", "c-trt": "failed"}
    assert second["c-trt"]["outputs"]["onnx"]["skipped"] and second["c-trt"]["outputs"]["onnx"]["runs"] == 1
    for name in ("a-hf", "mix-ties", "b-int4"):
        for fmt, output in second[name]["outputs"].items():
            old = first[name]["outputs"][fmt]
            assert output["runs"] == 1 and output["sha256"] == old["sha256"]
            assert output["finished_at"] == old["finished_at"]
    assert times == {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}

    from loraplex.export.outputs import file_sha256

    weights_sha = file_sha256(out / "mix-ties" / "hf" / "model.safetensors")
    (out / "mix-ties" / "hf" / "config.json").write_text("{}")  # a damaged output no longer matches its hash
    config = tmp_path / "a-copy" / "adapter_config.json"  # a changed adapter changes the recipe key
    config.write_text(json.dumps({**json.loads(config.read_text()), "lora_alpha": 3}))
    capsys.readouterr()
    assert cli("batch", manifest, "--no-progress") == 5
    third = results(out)
    assert third["a-hf"]["status"] == "done" and third["a-hf"]["outputs"]["hf"]["runs"] == 2
    assert third["mix-ties"]["outputs"]["hf"]["runs"] == 2 and third["mix-ties"]["outputs"]["onnx"]["skipped"]
    assert file_sha256(out / "mix-ties" / "hf" / "model.safetensors") == weights_sha  # same merge, redone
    assert no_partials(out)


def test_interrupted_batch_resumes(tiny, tmp_path):
    """Kill the batch (SIGKILL) after its first item, then resume with two worker processes."""
    items = [{"name": f"item{i}", "adapter": str(tiny["a" if i % 2 else "b"]), "formats": ["hf", "onnx"],
              "dtype": "fp32"} for i in range(3)]
    manifest = write_manifest(tmp_path / "m.toml", tiny["base"], items)
    out = tmp_path / "out"
    script = ("import argparse, sys; from loraplex.export.cli import add_export_parser, run_export; "
              "p = argparse.ArgumentParser(); add_export_parser(p.add_subparsers(dest='c')); "
              "sys.exit(run_export(p.parse_args(sys.argv[1:])))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script, "export", "batch", str(manifest)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "results.json").is_file() and results(out):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = results(out)
    assert list(finished) == ["item0"], "the batch must be killed while items remain"
    before = {fmt: o["finished_at"] for fmt, o in finished["item0"]["outputs"].items()}

    from loraplex.export.batch import BatchOptions, run_batch

    summary = run_batch(load_manifest(manifest, workers=2), BatchOptions(progress=False, threads_per_worker=1))
    assert (summary.done, summary.skipped, summary.failed) == (2, 1, 0)
    after = results(out)
    assert after["item0"]["status"] == "skipped"
    assert {fmt: o["finished_at"] for fmt, o in after["item0"]["outputs"].items()} == before
    assert all(after[f"item{i}"]["outputs"]["onnx"]["validation"]["passed"] for i in (1, 2))
    assert no_partials(out) and not list(out.rglob(".work"))


def test_manifest_errors_are_listed_together(tiny, tmp_path, cli, capsys):
    bad = write_manifest(tmp_path / "bad.toml", tiny["base"], [
        {"name": "x", "adapter": "a", "formats": ["gguf"]},
        {"name": "x", "adapter": "a"},
        {"name": "y", "adapter": "a", "formats": ["tensorrt"]},
        {"name": "z", "adapter": "a", "adapters": [("a", 1.0)]},
        {"name": "w", "adapter": "a", "colour": "blue"},
    ])
    assert cli("batch", bad) == 2
    err = capsys.readouterr().err
    for fragment in ("formats must be", "duplicate name 'x'", "add onnx to formats", "exactly one of adapter",
                     "unknown keys ['colour']"):
        assert fragment in err
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        load_manifest(tmp_path / "broken.json")


def test_json_manifest_and_shards(tiny, tmp_path):
    data = {"base": str(tiny["base"]), "workers": 3,
            "items": [{"name": f"i{n}", "adapter": str(tiny["a"])} for n in range(7)]}
    (tmp_path / "m.json").write_text(json.dumps(data))
    manifest = load_manifest(tmp_path / "m.json")
    assert manifest.workers == 3 and manifest.out == tmp_path / "exports"
    slices = [shard(manifest.items, k, 3) for k in range(3)]
    assert sorted(i.name for s in slices for i in s) == sorted(i.name for i in manifest.items)
    assert [i.name for i in slices[1]] == ["i1", "i4"]


def test_kubernetes_job_runs_one_shard_per_index():
    import yaml

    path = Path(__file__).resolve().parents[2] / "deploy" / "export-job.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    job = next(d for d in docs if d["kind"] == "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] <= spec["completions"]
    container = spec["template"]["spec"]["containers"][0]
    command = " ".join(container.get("command", []) + container.get("args", []))
    assert "export batch" in command and f"--shard ${{JOB_COMPLETION_INDEX}}/{spec['completions']}" in command
    assert spec["template"]["spec"]["restartPolicy"] == "Never" and spec.get("backoffLimitPerIndex", 0) >= 1


def _job_that_may_die(name: str) -> dict:
    """A worker job for test_a_dying_worker_fails_only_its_item: 'boom' kills its process."""
    if name == "boom":
        os._exit(9)
    return {"name": name, "status": "done"}


def test_a_dying_worker_fails_only_its_item():
    from loraplex.export.batch import run_in_workers

    recorded = []
    names = ["a", "boom", "b", "c", "d"]
    run_in_workers(_job_that_may_die, [(n,) for n in names], 2, recorded.append,
                   lambda job: {"name": job[0], "status": "failed"})
    assert sorted((e["name"], e["status"]) for e in recorded) == sorted(
        [(n, "failed" if n == "boom" else "done") for n in names])
