"""Blocks: profiles shaped in Arrow go through a bulk job without a Python object per row
(`outcomes.Block`). Whatever a block sends, journals and commits is what the same rows
as `Prepared` items would, and it is packed into the same jobs."""

from __future__ import annotations

import math
import random
from concurrent.futures import Future
from types import SimpleNamespace

import orjson
import pyarrow as pa
import pytest

from dbt_klaviyo_sync import runner
from dbt_klaviyo_sync.klaviyo.outcomes import Block, Outcome, Prepared, each
from dbt_klaviyo_sync.klaviyo.profiles import MAX_JOB_BYTES, MAX_JOB_PROFILES, pack_jobs
from dbt_klaviyo_sync.payloads import shaped_records, shaped_rows
from dbt_klaviyo_sync.runner import (
    ModelSync,
    SyncOptions,
    _forget_values,
    _journal_table,
    _outcome_table,
)
from tests.test_shaped_profiles import COLUMNS, _batch, _spec


def _block(seed: int, rows: int = 1500) -> Block:
    batch = _batch(rows, seed)
    batch = batch.append_column("__memo", pa.array(range(7, rows + 7), pa.uint64()))
    shaped, _ = shaped_rows(_spec("skip", COLUMNS), batch)
    assert shaped.num_rows > rows // 5  # enough to tell
    return Block(shaped)


def _items(block: Block) -> list[Prepared]:
    """The same rows as items made one by one, apart from the block's own."""
    records, bodies = shaped_records(block.rows)
    return list(map(Prepared, records, bodies))


@pytest.mark.parametrize("seed", range(3))
def test_a_block_journals_sends_and_commits_what_its_items_would(seed: int) -> None:
    block = _block(seed)
    items = _items(block)
    assert block.bodies() == b",".join(p.body for p in items)
    assert block.bodies(b"[", b"]") == b"[" + b",".join(p.body for p in items) + b"]"
    for kept in (False, True):
        assert _journal_table(block, kept).equals(_journal_table(items, kept))
    # Values kept until the commit are not journaled too (they cost a third of the CPU).
    assert _journal_table(block, True).column("accepted_values").null_count == len(block)
    assert _journal_table(block, False).column("accepted_values").null_count == 0
    accepted = Outcome(accepted=[(p.record, None) for p in items])
    assert _outcome_table(Outcome(blocks=[block]), values=False).equals(
        _outcome_table(accepted, values=False)
    )
    # Once journaled, the values' JSON goes (unless the warehouse keeps it until commit).
    _forget_values(block, keep_json=False)
    _forget_values(items, keep_json=False)
    forgotten = _outcome_table(Outcome(blocks=[block]), values=False)
    assert forgotten.equals(_outcome_table(accepted, values=False))
    assert forgotten.column("accepted_values").null_count == forgotten.num_rows
    # Records made from the block, for an answer about some rows, are the items' records.
    assert [p.record for p in block] == [p.record for p in items]
    assert list(block.records) == [p.record for p in items]


def _blocks(sizes: list[int], seed: int) -> list[Block]:
    """Blocks of rows with bodies of random sizes, some large enough to fill a job's 5 MB
    before its 10,000 profiles."""
    rng = random.Random(seed)
    blocks, start = [], 0
    for size in sizes:
        keys = [f"K{start + i}" for i in range(size)]
        bodies = [
            orjson.dumps({"type": "profile", "attributes": {"x": "y" * rng.choice([10, 900])}})
            for _ in keys
        ]
        start += size
        blocks.append(
            Block(
                pa.table(
                    {
                        "key": keys,
                        "fingerprint": pa.array(range(size), pa.uint64()),
                        "change": ["add"] * size,
                        "in_snapshot": [False] * size,
                        "klaviyo_id": pa.nulls(size, pa.string()),
                        "memo": pa.nulls(size, pa.uint64()),
                        "values_json": ["{}"] * size,
                        "body": [b.decode() for b in bodies],
                    }
                )
            )
        )
    return blocks


@pytest.mark.parametrize("list_id", [None, "LIST1"])
@pytest.mark.parametrize("seed", range(3))
def test_blocks_are_packed_into_the_jobs_their_items_would_make(
    seed: int, list_id: str | None
) -> None:
    rng = random.Random(seed)
    sizes = [rng.choice([1, 700, 3000, 9999, 10_000, 12_000]) for _ in range(6)]
    blocks = _blocks(sizes, seed)
    jobs = list(pack_jobs(blocks, list_id))
    expected = list(pack_jobs(list(each(blocks)), list_id))
    assert [[p.record.key for p in job] for job in jobs] == [
        [p.record.key for p in job] for job in expected
    ]
    assert all(isinstance(job, Block) for job in jobs)
    assert all(len(job) <= MAX_JOB_PROFILES for job in jobs)
    assert all(len(job.bodies()) < MAX_JOB_BYTES for job in jobs if isinstance(job, Block))
    assert any(len(job) < MAX_JOB_PROFILES for job in jobs[:-1])  # some filled by bytes


def test_items_and_blocks_go_in_jobs_of_their_own() -> None:
    blocks = _blocks([15_000, 20], 7)
    loose = _items(_blocks([30], 8)[0])
    jobs = list(pack_jobs([blocks[0], *loose[:10], blocks[1], *loose[10:]]))
    # The block's first full job goes at once; the loose items and the rest at the end.
    assert [type(job).__name__ for job in jobs] == ["Block", "list", "Block"]
    assert [p.record.key for p in jobs[1]] == [p.record.key for p in loose]
    assert [len(job) for job in (jobs[0], jobs[2])] == [
        len(job) for job in pack_jobs(list(each(blocks)))
    ]


class _Committed:
    """A warehouse that wants `commit_records` a commit, and keeps the keys of each."""

    commit_records = 1000
    values_until_commit = True

    def __init__(self) -> None:
        self.commits: list[list[str]] = []

    def commit(self, sid: str, run_id: str, model: str, outcomes: pa.Table) -> None:
        if outcomes.num_rows:  # as `State.commit`, nothing to do for nothing
            self.commits.append(outcomes.column("key").to_pylist())


def _answered(sync: ModelSync, *outcomes: Outcome) -> None:
    done: set[Future[Outcome]] = set()
    for outcome in outcomes:
        future: Future[Outcome] = Future()
        future.set_result(outcome)
        done.add(future)
    sync._answered(done)


def test_answers_are_committed_in_whole_multiples_of_commit_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DuckDB writes a commit of whole row groups straight into its file; a commit of more
    left a part-filled group beside them, which checkpoints merged by rewriting its
    neighbours (3.4 CPU-s after a first sync of 1M profiles). So when more answers than
    `commit_records` wait, a whole multiple of it is committed and the rest of the last
    jobs' rows wait for the next commit. Every answer is committed, once."""
    monkeypatch.setattr(runner, "COMMIT_SECONDS", math.inf)  # only the count decides
    warehouse = _Committed()
    options = SyncOptions("http://127.0.0.1:1", None, None)
    spec = SimpleNamespace(model="customers", object="profile", behavior="upsert")
    client = SimpleNamespace(rate_limit_wait=0.0)
    sync = ModelSync(warehouse, client, spec, SimpleNamespace(sid="s"), options)  # type: ignore[arg-type]
    blocks = _blocks([300] * 12, 3)
    _answered(sync, *(Outcome(blocks=[b]) for b in blocks[:4]))  # 1,200: 1,000 committed
    _answered(sync, Outcome(blocks=[blocks[4]]), Outcome(blocks=[blocks[5]]))  # 800 waiting
    _answered(sync, *(Outcome(blocks=[b]) for b in blocks[6:11]))  # 2,300: 2,000 committed
    # Answers of other kinds are never held back: here all are committed.
    loose = [(p.record, None) for p in _items(blocks[11])]
    _answered(sync, Outcome(accepted=loose * 4))
    sync._flush()
    assert [len(keys) for keys in warehouse.commits] == [1000, 2000, 1500]
    everything = [key for block in blocks[:11] for key in block.rows.column("key").to_pylist()]
    everything += [record.key for record, _ in loose * 4]
    assert sorted(key for keys in warehouse.commits for key in keys) == sorted(everything)
