"""Prepared adapter images on real PEFT adapters: a read gives back exactly the prepared, slot-packed tensors, as
views of one buffer; every kind of damage (data, header, length, another key) is refused, never returned."""
from __future__ import annotations

import json
import os
import struct
import threading

import pytest
import torch

from loraplex.server.adapters.loader import load_adapter
from loraplex.server.adapters.prepared_image import MAGIC, ImageCorrupt, image_key, read_image, write_image
from loraplex.server.lora.prepare import prepare_for_device
from loraplex.server.lora.slot_pack import pack_adapter
from loraplex.server.lora.stacks import llama_group_shapes


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def prepared(request, make_adapter, tiny_arch):
    folder, _ = make_adapter(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    weights = load_adapter(folder, tiny_arch, max_rank=16, name="plain")
    return weights, pack_adapter(prepare_for_device(weights, request.param, pin=False), llama_group_shapes(tiny_arch),
                                 max_rank=16)


def test_round_trip_is_bit_exact_and_one_buffer(prepared, tmp_path):
    weights, ready = prepared
    key = image_key(weights.sha256, weights.config, next(iter(ready.modules.values())).a.dtype)
    size = write_image(tmp_path / "x.img", key, ready)
    assert size == (tmp_path / "x.img").stat().st_size
    back = read_image(tmp_path / "x.img", key)
    assert set(back.modules) == set(ready.modules)
    for k, m in ready.modules.items():
        got = back.modules[k]
        assert got.scale == 1.0 and got.a.dtype == m.a.dtype
        assert torch.equal(got.a, m.a) and torch.equal(got.b, m.b)
    storages = {m.a.untyped_storage().data_ptr() for m in back.modules.values()}
    storages |= {m.b.untyped_storage().data_ptr() for m in back.modules.values()}
    assert storages == {back.pack.buffer.untyped_storage().data_ptr()}  # one allocation per adapter
    assert torch.equal(back.pack.buffer, ready.pack.buffer) and back.pack.blocks == ready.pack.blocks
    assert back.pack.layout == ready.pack.layout
    assert (back.name, back.sha256, back.config, back.source) == (ready.name, ready.sha256, ready.config,
                                                                  ready.source)


def test_key_depends_on_everything_that_shapes_the_bytes(prepared):
    weights, _ = prepared
    base = image_key(weights.sha256, weights.config, torch.bfloat16)
    assert image_key(weights.sha256, weights.config, torch.bfloat16) == base
    assert image_key(weights.sha256, weights.config, torch.float32) != base
    assert image_key(weights.sha256, {**weights.config, "lora_alpha": 16}, torch.bfloat16) != base
    assert image_key("0" * 64, weights.config, torch.bfloat16) != base
    assert image_key(weights.sha256, weights.config, torch.bfloat16, "another-layout") != base


def _rewrite_header(path, raw: bytearray, header_len: int, how: str) -> None:
    start = len(MAGIC) + 8
    header = json.loads(bytes(raw[start:start + header_len]))
    data = bytes(raw[-header["data_bytes"]:])
    if how == "offsets":
        header["blocks"][0][6] = header["data_bytes"]  # A past the end
    elif how == "ranks":
        header["blocks"][0][4] = [99] * len(header["blocks"][0][4])  # ranks beyond the block's rows
    else:
        header["blocks"][0][7] = [1, 10 ** 9, 1]
    text = json.dumps(header).encode()
    head = MAGIC + struct.pack("<Q", len(text)) + text
    path.write_bytes(head + b"\0" * (-len(head) % 64) + data)


def _damage(path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[len(MAGIC):len(MAGIC) + 8])
    if how == "data_byte":
        raw[-5] ^= 0x40
    elif how == "truncated":
        del raw[-100:]
    elif how == "extended":
        raw += b"\0" * 64
    elif how == "magic":
        raw[:4] = b"JUNK"
    elif how == "header_json":
        raw[len(MAGIC) + 8] = ord("[")
    elif how == "header_length":
        raw[len(MAGIC):len(MAGIC) + 8] = struct.pack("<Q", 1 << 40)
    elif how in ("offsets", "shape", "ranks"):  # a block table that does not fit the data, the checksum still valid
        _rewrite_header(path, raw, header_len, how)
        return
    elif how == "empty":
        raw = bytearray()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["data_byte", "truncated", "extended", "magic", "header_json", "header_length",
                                 "offsets", "shape", "ranks", "empty"])
def test_damaged_images_are_refused(prepared, tmp_path, how):
    weights, ready = prepared
    key = image_key(weights.sha256, weights.config, torch.float32)
    path = tmp_path / "x.img"
    write_image(path, key, ready)
    _damage(path, how)
    with pytest.raises(ImageCorrupt):
        read_image(path, key)


def test_another_key_or_a_missing_file_is_refused(prepared, tmp_path):
    weights, ready = prepared
    key = image_key(weights.sha256, weights.config, torch.float32)
    write_image(tmp_path / "x.img", key, ready)
    with pytest.raises(ImageCorrupt, match="key"):
        read_image(tmp_path / "x.img", image_key("0" * 64, weights.config, torch.float32))
    with pytest.raises(ImageCorrupt, match="missing"):
        read_image(tmp_path / "absent.img", key)


def test_unprepared_weights_are_not_written(prepared, tmp_path):
    weights, _ = prepared  # scales still 2.0, not packed: an image must hold what the slots take as it is
    unpacked = prepare_for_device(weights, torch.float32, pin=False)  # scales folded, not laid out for the slots
    for unfit in (weights, unpacked):
        with pytest.raises(ValueError, match="not prepared"):
            write_image(tmp_path / "images" / "x.img", "k", unfit)
    assert not (tmp_path / "images").exists()


def test_an_image_streams_from_a_pipe(prepared, tmp_path):
    """No seek: the image reads front to back (a FIFO fed by another thread serves as a slow source)."""
    weights, ready = prepared
    key = image_key(weights.sha256, weights.config, ready.pack.dtype)
    write_image(tmp_path / "x.img", key, ready)
    raw = (tmp_path / "x.img").read_bytes()
    os.mkfifo(tmp_path / "pipe.img")

    def feed():
        with open(tmp_path / "pipe.img", "wb") as f:
            for start in range(0, len(raw), 4096):
                f.write(raw[start:start + 4096])
    writer = threading.Thread(target=feed)
    writer.start()
    back = read_image(tmp_path / "pipe.img", key)
    writer.join()
    assert torch.equal(back.pack.buffer, ready.pack.buffer)
