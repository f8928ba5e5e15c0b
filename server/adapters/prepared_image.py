"""Prepared adapter images: an adapter exactly as the host tier holds it, in one file read with one call.

A registration validates the PEFT folder once (shapes, ranks, finite values, sha256 of the weights) and
writes its prepared form (scale folded into B, compute dtype, see `lora.prepare`) packed as the device slots
take it (`lora.slot_pack`: one block per pool) as an image. A host-tier miss then reads the image into one
buffer with a single `readinto` and makes every block and every A and B a view of it: no safetensors parsing,
no sha256, no per-tensor allocation or copy; a slot fill copies from it (through a pinned staging buffer on a
GPU, `lora.slot_filler`). Images are named by a key over everything that shapes their bytes (the weights'
sha256, the config, the dtype, the slot layout, the format), so a key names one content wherever it is written.

    magic "LPXIMG02" | header length (u64 LE) | header JSON | zero padding to 64 | data (the pack's buffer)

The header repeats the key and lists every group block (layer, group, slices, ranks, offsets, shapes); the data
carries an xxh3-64 checksum (~20 GB/s: 4 ms for an 84 MB adapter). A read that finds anything amiss raises
`ImageCorrupt`; the caller rebuilds the image from the registered folder. Writes go to a temporary file
replaced atomically, so a reader never sees half an image.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import uuid
from pathlib import Path

import torch
import xxhash

from .types import AdapterWeights, GroupBlock, SlotPack

log = logging.getLogger(__name__)

MAGIC = b"LPXIMG02"
FORMAT = 2
ALIGN = 64
MAX_HEADER_BYTES = 16 << 20
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ImageCorrupt(Exception):
    """An image that is missing, truncated, altered or of another content: rebuild it, never serve it."""


def image_key(sha256: str, config: dict, dtype: torch.dtype, layout: str = "") -> str:
    """The content key of an adapter's prepared image (weights, config, dtype and slot layout decide its bytes)."""
    recipe = json.dumps({"format": FORMAT, "sha256": sha256, "config": config, "dtype": _name(dtype),
                         "layout": layout}, sort_keys=True, default=str)
    return hashlib.sha256(recipe.encode()).hexdigest()[:40]


def write_image(path: Path, key: str, prepared: AdapterWeights) -> int:
    """Write `prepared` (packed for the slots: lora.slot_pack) as the image `key` at `path`; returns its size."""
    pack = prepared.pack
    if pack is None or any(m.scale != 1.0 for m in prepared.modules.values()):
        raise ValueError(f"{prepared.name}: the adapter is not prepared (scales folded, packed for the slots)")
    blocks = [[b.layer, b.name, list(b.slices), list(b.out_features), list(b.ranks), b.rows, b.a_offset,
               list(b.a_shape), b.bt_offset, list(b.bt_shape)] for b in pack.blocks]
    data = memoryview(pack.buffer.numpy())
    header = json.dumps({"format": FORMAT, "key": key, "dtype": _name(pack.dtype), "layout": pack.layout,
                         "name": prepared.name, "source": prepared.source, "sha256": prepared.sha256,
                         "config": prepared.config, "blocks": blocks, "data_bytes": data.nbytes,
                         "xxh3_64": xxhash.xxh3_64_hexdigest(data)}, default=str).encode()
    head = MAGIC + struct.pack("<Q", len(header)) + header
    head += b"\0" * (_aligned(len(head)) - len(head))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(head) + data.nbytes


def read_image(path: Path, key: str) -> AdapterWeights:
    """The packed adapter of image `key` at `path`: its pack's buffer read with one call, modules views of it.

    Reads front to back with no seek, so a pipe or socket-backed file serves as well as a disk file."""
    try:
        with open(path, "rb") as f:
            fixed = f.read(len(MAGIC) + 8)
            if len(fixed) != len(MAGIC) + 8 or fixed[:len(MAGIC)] != MAGIC:
                raise ImageCorrupt(f"{path.name}: not a prepared adapter image")
            (header_len,) = struct.unpack("<Q", fixed[len(MAGIC):])
            if header_len > MAX_HEADER_BYTES:
                raise ImageCorrupt(f"{path.name}: header of {header_len} bytes")
            header = _header(f.read(header_len), path)
            if header.get("format") != FORMAT or header.get("key") != key or header.get("dtype") not in _DTYPES:
                raise ImageCorrupt(f"{path.name}: format, key or dtype is not the expected one")
            size = int(header["data_bytes"])
            padding = _aligned(len(MAGIC) + 8 + header_len) - (len(MAGIC) + 8 + header_len)
            if len(f.read(padding)) != padding:
                raise ImageCorrupt(f"{path.name}: data is not {size} bytes")
            buffer = torch.empty(size, dtype=torch.uint8)
            if f.readinto(memoryview(buffer.numpy())) != size or f.read(1):
                raise ImageCorrupt(f"{path.name}: data is not {size} bytes")
    except FileNotFoundError:
        raise ImageCorrupt(f"{path.name}: missing") from None
    if xxhash.xxh3_64_hexdigest(memoryview(buffer.numpy())) != header["xxh3_64"]:
        raise ImageCorrupt(f"{path.name}: checksum mismatch")
    dtype = _DTYPES[header["dtype"]]
    try:
        blocks = tuple(_block(entry, size, dtype) for entry in header["blocks"])
        pack = SlotPack(buffer=buffer, dtype=dtype, layout=str(header["layout"]), blocks=blocks)
        modules = pack.module_views()
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError) as exc:
        raise ImageCorrupt(f"{path.name}: block table does not fit its data ({exc})") from None
    return AdapterWeights(name=header["name"], modules=modules, source=header["source"], sha256=header["sha256"],
                          config=header["config"], pack=pack)


def _block(entry: list, size: int, dtype: torch.dtype) -> GroupBlock:
    layer, name, slices, out_features, ranks, rows, a_offset, a_shape, bt_offset, bt_shape = entry
    block = GroupBlock(int(layer), str(name), tuple(str(m) for m in slices), tuple(int(n) for n in out_features),
                       tuple(int(r) for r in ranks), int(rows), int(a_offset), tuple(int(d) for d in a_shape),
                       int(bt_offset), tuple(int(d) for d in bt_shape))
    element = torch.empty((), dtype=dtype).element_size()
    for offset, shape in ((block.a_offset, block.a_shape), (block.bt_offset, block.bt_shape)):
        nbytes = element
        for d in shape:
            if d < 0:
                raise ValueError(f"shape {list(shape)}")
            nbytes *= d
        if offset < 0 or offset % ALIGN or offset + nbytes > size:
            raise ValueError(f"block at {offset} of {nbytes} bytes, shape {list(shape)}")
    if len(block.a_shape) != 3 or len(block.bt_shape) != 2 or block.a_shape[1] != block.rows \
            or block.bt_shape[0] != block.rows or len(block.ranks) != block.a_shape[0] \
            or max(block.ranks, default=0) != block.rows or len(block.slices) != len(block.ranks) \
            or len(block.out_features) != len(block.ranks) or sum(block.out_features) != block.bt_shape[1]:
        raise ValueError(f"block {block.layer}/{block.name}: shapes and ranks disagree")
    return block


def _header(raw: bytes, path: Path) -> dict:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ImageCorrupt(f"{path.name}: header is not JSON") from None
    if not isinstance(header, dict):
        raise ImageCorrupt(f"{path.name}: header is not an object")
    return header


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class PreparedImages:
    """The image folder of one engine: `key.img` files, written at registration, read on host-tier misses.

    Failing to write an image (a full disk, say) costs only speed: the registered folder still serves."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.img"

    def save(self, key: str, prepared: AdapterWeights, replace: bool = False) -> bool:
        """Write the image unless one is there already (a re-registration of the same content)."""
        if not replace and self.path(key).is_file():
            return True
        try:
            write_image(self.path(key), key, prepared)
            return True
        except OSError as exc:
            log.warning("adapter %s: could not write its prepared image (%s); host misses read its folder",
                        prepared.name, exc)
            return False

    def load(self, key: str) -> AdapterWeights:
        return read_image(self.path(key), key)

    def remove(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
