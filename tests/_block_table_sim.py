"""A seeded toy scheduler that drives a `BlockTableState` the way a serving engine would.

Shared by tests/test_block_table.py and the torch and JAX device-half tests (import it as
`from _block_table_sim import Scheduler`; pytest puts tests/ on sys.path). The scheduler keeps
its own truth (each request's page list in a dict) independently of the state, so a test can
rebuild the table from scratch and compare it with the state's mirror and a device table.

Each step: requests finish, some are preempted (and later re-admitted with fresh pages), the
table is condensed by moves (or not, leaving holes), rows are swapped now and then, new
requests arrive (some sharing prefix pages with a running request), every running request
grows (a prefill chunk or one decode token) and gets the pages it needs (several per row via
`append`, single pages via `append_many`), and a request's pages are occasionally replaced
(`set`). Then the step's record is taken, and the step's batch described.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import attnsync
from attnsync._block_table import BlockTableState, BlockTableUpdates, bucket_count


@dataclass
class Request:
    rid: int
    prompt: int  # prompt tokens (prefilled in chunks)
    total: int  # tokens it ends with
    pages: list[int] = field(default_factory=list)
    computed: int = 0  # tokens in the cache before this step
    row: int = -1


@dataclass
class Step:
    """One scheduled step: the batch's table rows (decode-first order) and its per-row sizes."""

    updates: BlockTableUpdates
    rows: np.ndarray  # table row of each real batch row
    query_lens: np.ndarray
    seq_lens: np.ndarray
    is_prefilling: np.ndarray
    exact: np.ndarray
    padded_num_reqs: int
    padded_num_tokens: int


class Scheduler:
    def __init__(self, seed: int, *, max_rows: int = 40, width: int = 24, block_size: int = 4,
                 num_cache_pages: int = 1200, pad_records: bool | None = None, chunk: int = 12) -> None:
        self.rng = np.random.default_rng(seed)
        self.block_size = block_size
        self.width = width
        self.chunk = chunk
        self.pad_records = pad_records
        self.state = BlockTableState(max_rows, width, num_cache_pages)
        self.free_pages = list(range(num_cache_pages - 1, 0, -1))  # page 0 is the padding page
        self.refs: dict[int, int] = {}
        self.running: dict[int, Request] = {}  # by row
        self.waiting: list[Request] = []
        self.next_id = 0
        self.verbs: dict[str, int] = {}

    # -- bookkeeping --------------------------------------------------------------------------

    def _count(self, verb: str) -> None:
        self.verbs[verb] = self.verbs.get(verb, 0) + 1

    def _alloc(self, n: int) -> list[int] | None:
        if len(self.free_pages) < n:
            return None
        pages = [self.free_pages.pop() for _ in range(n)]
        for page in pages:
            self.refs[page] = 1
        return pages

    def _release(self, pages: list[int]) -> None:
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                del self.refs[page]
                self.free_pages.append(page)

    def _free_rows(self) -> list[int]:
        return [r for r in range(self.state.max_rows) if r not in self.running]

    def _drop(self, req: Request) -> None:
        self.state.remove(req.row)
        self._count("remove")
        del self.running[req.row]
        self._release(req.pages)
        req.pages = []
        req.row = -1

    def _pages_needed(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def table_from_scratch(self) -> np.ndarray:
        """The device-layout table the requests imply, built from the dict alone."""
        table = np.zeros(self.state.device_shape, dtype=np.int32)
        for row, req in self.running.items():
            table[row, : len(req.pages)] = req.pages
        return table

    # -- one step -----------------------------------------------------------------------------

    def step(self) -> Step:
        rng = self.rng
        max_tokens = self.width * self.block_size
        # finished requests, and those about to outgrow the table
        for req in list(self.running.values()):
            if req.computed >= req.total or rng.random() < 0.02:
                self._drop(req)
        # preemption: back to the waiting queue, recomputed from scratch when re-admitted
        if self.running and rng.random() < 0.08:
            req = self.running[int(rng.choice(list(self.running)))]
            self._drop(req)
            req.prompt, req.computed = min(req.computed + 1, max_tokens - 1), 0
            self.waiting.append(req)
        # condensing: the last live rows move into the holes (most steps), so rows are [0, n)
        if rng.random() < 0.7:
            live = sorted(self.running)
            holes = [r for r in range(len(live)) if r not in self.running]
            for hole in holes:
                last = max(self.running)
                if last < hole:
                    break
                req = self.running.pop(last)
                self.state.move(last, hole)
                self._count("move")
                req.row = hole
                self.running[hole] = req
        # a swap now and then (reordering), either row possibly free
        if rng.random() < 0.25:
            a, b = (int(x) for x in rng.choice(self.state.max_rows, 2, replace=False))
            self.state.swap(a, b)
            self._count("swap")
            ra, rb = self.running.pop(a, None), self.running.pop(b, None)
            if ra is not None:
                ra.row = b
                self.running[b] = ra
            if rb is not None:
                rb.row = a
                self.running[a] = rb
        # arrivals (the re-admitted first), some sharing a running request's full prefix pages
        for _ in range(int(rng.integers(0, 4))):
            free = self._free_rows()
            if not free:
                break
            if self.waiting and rng.random() < 0.5:
                req = self.waiting.pop(0)
            else:
                prompt = int(rng.integers(1, max_tokens // 2))
                req = Request(self.next_id, prompt, min(max_tokens, prompt + int(rng.integers(1, max_tokens))))
                self.next_id += 1
            shared: list[int] = []
            donors = [r for r in self.running.values() if r.computed >= 2 * self.block_size]
            if donors and rng.random() < 0.3:
                donor = donors[int(rng.integers(len(donors)))]
                full = min(donor.computed // self.block_size, self._pages_needed(req.prompt) - 1)
                if full > 0:
                    shared = donor.pages[: int(rng.integers(1, full + 1))]
                    for page in shared:
                        self.refs[page] += 1
            req.pages = list(shared)
            req.computed = len(shared) * self.block_size  # the shared prefix is cached already
            req.row = free[0] if rng.random() < 0.8 else free[int(rng.integers(len(free)))]
            self.state.add(req.row, req.pages)
            self._count("add")
            self.running[req.row] = req
        # a request's pages replaced now and then (its cache moved to other pages)
        if self.running and rng.random() < 0.05:
            req = self.running[int(rng.choice(list(self.running)))]
            fresh = self._alloc(len(req.pages))
            if fresh is not None:
                self._release(req.pages)
                req.pages = fresh
                self.state.set(req.row, fresh)
                self._count("set")
        # growth: each running request gets its tokens for this step and the pages they need
        decode_rows, decode_pages = [], []
        rows, query_lens, seq_lens, prefilling = [], [], [], []
        for row in sorted(self.running):
            req = self.running[row]
            if req.computed < req.prompt:
                query = min(self.chunk, req.prompt - req.computed)
            else:
                query = 1
            query = min(query, max_tokens - req.computed)
            if query <= 0:
                continue
            need = self._pages_needed(req.computed + query) - len(req.pages)
            if need > 0:
                pages = self._alloc(need)
                if pages is None:
                    continue  # out of pages: it waits a step
                req.pages.extend(pages)
                if need == 1 and rng.random() < 0.7:
                    decode_rows.append(row)
                    decode_pages.append(pages[0])
                else:
                    self.state.append(row, pages)
                    self._count("append")
            rows.append(row)
            query_lens.append(query)
            seq_lens.append(req.computed + query)
            prefilling.append(req.computed + query < req.prompt)
        if decode_rows:
            self.state.append_many(decode_rows, decode_pages)
            self._count("append_many")
        pad = self.pad_records if self.pad_records is not None else bool(rng.random() < 0.5)
        updates = self.state.take_updates(pad=pad)
        for row, query in zip(rows, query_lens, strict=True):
            self.running[row].computed += query
        # decode-first order: decodes (one token, not prefilling) first, then the rest
        q = np.asarray(query_lens, dtype=np.int32)
        prefilling = np.asarray(prefilling, dtype=bool)
        is_decode = (q == 1) & ~prefilling
        order = np.argsort(~is_decode, kind="stable")
        n, t = len(rows), int(q.sum())
        exact = np.ones(n, dtype=bool)
        context = (np.asarray(seq_lens, dtype=np.int32) > q)
        if rng.random() < 0.2:  # some decode rows as upper bounds (async speculative decoding)
            exact[(rng.random(n) < 0.3) & is_decode & context] = False
        padded = rng.random() < 0.5
        return Step(
            updates=updates,
            rows=np.asarray(rows, dtype=np.int32)[order],
            query_lens=q[order],
            seq_lens=np.asarray(seq_lens, dtype=np.int32)[order],
            is_prefilling=prefilling[order],
            exact=exact[order],
            padded_num_reqs=bucket_count(n) if padded else n,
            padded_num_tokens=bucket_count(t) if padded else t,
        )

    def batch(self, step: Step, table: np.ndarray) -> attnsync.Batch:
        """The step's batch over `table`'s rows (the state's mirror, or one from scratch)."""
        return attnsync.Batch(
            query_lens=step.query_lens, seq_lens=step.seq_lens, block_table=table[step.rows],
            block_size=self.block_size, seq_lens_exact=step.exact, is_prefilling=step.is_prefilling,
            padded_num_reqs=step.padded_num_reqs, padded_num_tokens=step.padded_num_tokens,
        )
