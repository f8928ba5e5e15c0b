import pytest

from loraplex.server.engine.block_manager import BlockManager


def test_block_zero_is_never_handed_out_and_free_returns_everything():
    bm = BlockManager(num_blocks=9, block_size=4)
    assert bm.capacity == 8 and bm.num_available_blocks == 8
    bm.reserve(1, 30)  # 8 blocks
    table: list[int] = []
    bm.grow(1, table, 30)
    assert 0 not in table and len(table) == 8 and len(set(table)) == 8
    assert bm.num_available_blocks == 0 and bm.usage == 1.0
    bm.free(1, table)
    assert table == [] and bm.num_available_blocks == 8 and bm.usage == 0.0


def test_reservation_is_admission_control():
    bm = BlockManager(num_blocks=11, block_size=4)
    assert bm.can_reserve(40) and not bm.can_reserve(41)
    bm.reserve(1, 20)  # 5 blocks promised, none handed out yet
    assert bm.num_free_blocks == 10 and bm.num_available_blocks == 5
    assert bm.can_reserve(20) and not bm.can_reserve(21)
    table: list[int] = []
    bm.grow(1, table, 5)  # 2 blocks handed out of the promise
    assert bm.num_free_blocks == 8 and bm.num_available_blocks == 5
    with pytest.raises(RuntimeError, match="past its reservation"):
        bm.grow(1, table, 21)


def test_free_of_a_waiting_sequence_releases_its_promise():
    bm = BlockManager(num_blocks=5, block_size=2)
    bm.reserve(7, 8)
    assert bm.num_available_blocks == 0
    bm.free(7, [])
    assert bm.num_available_blocks == 4
    bm.free(7, [])  # idempotent
    assert bm.num_available_blocks == 4
