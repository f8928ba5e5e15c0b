"""The scheduler's token budget (issue 12 #2): decodes first, long prefills capped while others decode,
short requests admitted beside a long prompt, a lone prompt still prefilled at the full budget.

These drive the real Scheduler over real Sequences with the engine's bookkeeping (compute n tokens,
sample one when the prompt is done, finish at max_new_tokens); tests/service/test_hostile.py runs the
same situation through a served model."""
from __future__ import annotations

import pytest

from loraplex.server.config import SchedulerConfig
from loraplex.server.engine.handle import RequestHandle
from loraplex.server.engine.scheduler import Admission, Scheduler
from loraplex.server.engine.sequence import Sequence, SeqStatus
from loraplex.server.engine.stop import StopChecker
from loraplex.server.errors import ConfigError
from loraplex.server.types import GenerationRequest


def sequence(seq_id: int, prompt_len: int, max_new: int) -> Sequence:
    return Sequence(seq_id=seq_id, request=GenerationRequest(prompt="x"), request_id=str(seq_id),
                    prompt_ids=[1] * prompt_len, max_new_tokens=max_new, seed=0, needs=(), adapter_versions={},
                    handle=RequestHandle(str(seq_id)), detokenizer=None, stop_checker=StopChecker())


def step(scheduler: Scheduler, admit=lambda seq: Admission.ADMITTED) -> list[tuple[Sequence, int]]:
    """One engine step's bookkeeping: the batch is computed, finished prompts sample a token."""
    batch = scheduler.schedule(admit)
    for seq, n in batch:
        assert 1 <= n <= seq.num_uncomputed
        seq.num_computed += n
        if seq.num_uncomputed == 0:
            seq.output_ids.append(7)
            if len(seq.output_ids) >= seq.max_new_tokens:
                scheduler.remove(seq)
                seq.status = SeqStatus.FINISHED
    return batch


def run_until_done(scheduler: Scheduler, seq: Sequence, limit: int = 1000) -> int:
    for steps in range(1, limit + 1):
        step(scheduler)
        if seq.status is SeqStatus.FINISHED:
            return steps
    raise AssertionError(f"sequence {seq.seq_id} not done in {limit} steps")


def test_short_request_beside_an_8k_prompt_finishes_in_a_few_steps():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512))
    long = sequence(0, 8100, 4)
    scheduler.add(long)
    step(scheduler)
    assert long.num_computed == 512  # alone: the whole budget
    short = sequence(1, 20, 4)
    scheduler.add(short)
    first = dict((s.seq_id, n) for s, n in step(scheduler))
    assert first[1] == 20  # admitted at once, its whole prompt in this step
    steps = 1 + run_until_done(scheduler, short)
    assert steps <= 5 and long.status is SeqStatus.RUNNING and long.num_uncomputed > 6000
    # The old policy gave the running prompt the whole budget first: the short one waited ~16 steps.


def test_long_prefill_is_capped_while_others_decode_and_decodes_come_first():
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, long_prefill_token_threshold=64)
    scheduler = Scheduler(config)
    decoders = [sequence(i, 3, 50) for i in range(3)]
    for seq in decoders:
        scheduler.add(seq)
    step(scheduler)  # their prompts
    long = sequence(9, 5000, 2)
    scheduler.add(long)
    for _ in range(10):
        batch = dict((s.seq_id, n) for s, n in step(scheduler))
        assert all(batch[s.seq_id] == 1 for s in decoders)  # every decode, every step
        assert batch[9] == 64  # capped: each of these steps costs about 67 tokens, not 256
    assert sum(n for _, n in step(scheduler)) <= 3 + 64


def test_lone_prompts_use_the_whole_budget_oldest_first():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, long_prefill_token_threshold=100))
    a, b = sequence(0, 1000, 1), sequence(1, 1000, 1)
    scheduler.add(a)
    scheduler.add(b)
    batch = dict((s.seq_id, n) for s, n in step(scheduler))
    assert batch == {0: 412, 1: 100}  # each got its capped chunk, then the oldest the rest


def test_several_short_requests_admitted_beside_two_long_prompts():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512))
    longs = [sequence(i, 6000, 2) for i in range(2)]
    for seq in longs:
        scheduler.add(seq)
    step(scheduler)
    shorts = [sequence(10 + i, 30, 3) for i in range(4)]
    for seq in shorts:
        scheduler.add(seq)
    for _ in range(6):
        step(scheduler)
    assert all(s.status is SeqStatus.FINISHED for s in shorts)
    assert all(s.status is SeqStatus.RUNNING for s in longs)


def test_blocked_admission_keeps_fcfs_and_budget_goes_to_running():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128))
    long, waiting = sequence(0, 1000, 1), sequence(1, 10, 1)
    scheduler.add(long)
    step(scheduler)
    scheduler.add(waiting)
    batch = step(scheduler, admit=lambda seq: Admission.BLOCK)  # e.g. short of KV blocks
    assert [(s.seq_id, n) for s, n in batch] == [(0, 128)] and list(scheduler.waiting) == [waiting]


@pytest.mark.parametrize("threshold", [0, 513])
def test_threshold_must_fit_the_budget(threshold):
    with pytest.raises(ConfigError, match="long_prefill_token_threshold"):
        SchedulerConfig(max_num_batched_tokens=512, long_prefill_token_threshold=threshold)
