"""Lower attnsync host metadata to torch tensors with one pinned, non-blocking copy.

Importing this module imports torch: that import is the user's choice of framework.

`lower(md, device=...)` returns a frozen object with vLLM's field names: device fields are
views into one staged device buffer (one `non_blocking` copy on the current stream), host
mirrors are CPU tensors, host scalars stay Python ints. Nothing here reads a device value.
Who owns the memory behind a lowering, and for how long, is `Stager`'s contract.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

import numpy as np
import torch

from .._plan import BUILT_MARK, LoweringPlan, StepLayout, check_lowerable, plan_of
from .._staging import PackedLayout, SlotRing, StagingStats, pack, pack_fields, plan_layout, unpack
from .._validate import SpecError
from . import _torch_table_lowering as _table_lowering
from ._cuda_calls import CurrentStream, HostToDevice
from ._pinned_tables import PinnedTables
from ._torch_lowered import DECLARED as _DECLARED
from ._torch_lowered import (
    TorchCommonMetadata,
    TorchFlashInferMetadata,
    TorchFlexMetadata,
    TorchLowering,
    TorchMambaMetadata,
    TorchTreeMetadata,
    TorchTritonMetadata,
    TorchTurboQuantMetadata,
)

if TYPE_CHECKING:  # (the metadata classes, for `lower`'s overloads only)
    from .._spec import CommonMetadata
    from ..backends.flashinfer import FlashInferMetadata
    from ..backends.flex import FlexMetadata
    from ..backends.mamba import MambaMetadata
    from ..backends.tree import TreeMetadata
    from ..backends.triton import TritonMetadata
    from ..backends.turboquant import TurboQuantMetadata

__all__ = [
    "TORCH_DTYPES",
    "PinnedTables",
    "Stager",
    "StaleLoweringError",
    "TorchCommonMetadata",
    "TorchFlashInferMetadata",
    "TorchFlexMetadata",
    "TorchLowering",
    "TorchMambaMetadata",
    "TorchTreeMetadata",
    "TorchTritonMetadata",
    "TorchTurboQuantMetadata",
    "default_stager",
    "device_slot_mapping",
    "lower",
    "lower_replicated",
    "slots_from_device_lengths",
    "token_rows_and_back",
    "views_of",
    "with_fields",
]

# The torch dtype each numpy dtype becomes; the core speaks numpy only.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
    "float32": torch.float32,
}
# Fields whose device copy is wider in torch than in the host metadata: vLLM's cache-write
# kernels take int64 slot ids. The host value is int32 (validated to fit), so JAX stays int32.
_WIDE = (("slot_mapping", np.int64),)
_T = TypeVar("_T")


class StaleLoweringError(SpecError):
    """A checking `Stager` found a lowering still referenced when its memory came round again."""


class Stager:
    """Stages lowerings onto one device and owns the memory it reuses. The ownership contract:

    - ``depth=0`` (what `lower` uses without a stager): every lowering gets fresh pinned and
      device memory from torch's caching allocators, so nothing handed out is ever rewritten.
      torch keeps a pinned block from reuse until the copy that reads it has executed.
    - ``depth=N >= 2``: the stager owns a ring of N slots, each a pinned host buffer, a device
      buffer and a CUDA event. Lowering k writes slot k mod N, so **a lowering stays valid until
      N - 1 further lowerings through this stager have been made**; the N-th one rewrites its
      memory. Keep a value longer with `.clone()`, or use a deeper ring. The usual loop
      (`tmd = lower(md, stager=s)` once a step) holds one lowering at a time and needs N = 2.
    - ``persistent=True``: fixed device addresses for CUDA graphs. Every lowering writes the same
      device buffer (one layout: pad batches to one bucket; another layout is refused before
      anything is written) and returns tensors at the same addresses, valid until the next
      lowering. Host slots still rotate (``depth``, at least 2).

    Rewrites are safe for the GPU without a host wait: a slot's pinned buffer is repacked only
    after the event recorded after its last copy has completed (else the host waits for it and
    `stats.event_waits` counts it), and its device buffer is rewritten by a copy queued on the
    current stream, after every kernel already queued there. A stager therefore serves one
    stream: consumers on another stream must order themselves after the copy (and lowering onto
    another stream needs its own stager). ``check=True`` (the tests use it) refuses misuse: when
    a slot comes round while its earlier lowering, or any tensor or view of it, is still alive,
    the lowering raises `StaleLoweringError` instead of rewriting it, and a change of stream is
    refused too. Checking makes fresh views per lowering (weak references to them are how it
    knows), so it is slower. DLPack exports of a lowering's tensors are not seen by the check:
    clone what you export, or keep the lowering alive for as long as the export is used.

    Args:
        device: the target device (`"cuda"`, `"cuda:1"`, `"cpu"`, a `torch.device`).
        depth: ring slots (0: fresh memory per lowering; else >= 2).
        persistent: fixed device addresses (see above).
        check: refuse a rewrite of memory that is still referenced (see above).

    Attributes:
        device: the resolved `torch.device` (CUDA with its index).
        table_memory: a `PinnedTables` for `attnsync.Batch(..., table_memory=...)` on CUDA (None
            elsewhere): a batch whose block table lies there is copied without packing the table
            again.
        stats: `StagingStats` (copies issued, event waits, slot grows).
    """

    def __init__(self, device: Any = "cuda", *, depth: int = 2, persistent: bool = False,
                 check: bool = False) -> None:
        self.device = _as_device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0 or depth == 1:
            raise SpecError(f"depth: expected 0 (fresh memory per lowering) or an int >= 2, received {depth!r}.")
        if persistent:
            depth = max(depth, 2)
        self.depth, self.persistent, self.check = depth, bool(persistent), bool(check)
        self._cuda = self.device.type == "cuda"
        self._lock = threading.Lock()
        self._fixed: tuple[PackedLayout, torch.Tensor] | None = None  # persistent: (layout, buffer)
        self._stream: torch.cuda.Stream | None = None  # check mode: the stream this stager serves
        self._accepted: set[str] = set()  # device names already checked against self.device
        self._handed: list[tuple[tuple[str, weakref.ref[torch.Tensor]], ...]] = [()] * depth  # check mode, per slot
        self.table_memory = PinnedTables() if self._cuda else None
        self._ring = None
        if depth:
            # The one guard of reused pinned memory: a slot is repacked only once the event
            # recorded after its last copy has completed (attnsync._staging.SlotRing); the host
            # waits (`synchronize`) only while a copy from `depth` lowerings back is still pending.
            self._ring = SlotRing(num_slots=depth, allocate=self._allocate_slot,
                                  is_done=(lambda event: event.query()) if self._cuda else bool,
                                  wait=(lambda event: event.synchronize()) if self._cuda else bool)  # type: ignore[arg-type]  # (bool: nothing to wait for on the CPU)
        self.stats = self._ring.stats if self._ring is not None else StagingStats()
        if self._cuda and depth:
            self._current = CurrentStream(self.device.index)
            self._host_to_device = HostToDevice(self.device)
            # torch's pinned allocator does not see direct copies: a dropped stager's pinned
            # buffers are freed only after their last copies have run.
            weakref.finalize(self, _wait_for_copies, self._ring, self.table_memory).atexit = False  # type: ignore[arg-type]  # (both exist on CUDA)

    def lower(self, plan: LoweringPlan, values: dict[str, Any]) -> dict[str, Any]:
        """Stage one step's fields (`values`: a metadata instance dict); returns the lowered
        fields by lowered name (device views and host mirrors; scalars are the caller's)."""
        step = plan.layouts(values, _WIDE)
        if self._ring is None:
            return self._lower_fresh(plan, step, values)
        staged, mirrors = plan.staged_of(values), plan.mirrors_of(values)
        with self._lock:
            if self.persistent:
                self._fixed_buffer(step.staged)  # refuses another layout before anything is written
            if self.check:
                self._refuse_stale(self._ring.next_index)
            index, memory, _ = self._ring.acquire(step.nbytes)  # waits while its last copy may be pending
            entry: _Entry = memory.entries.get(step) or memory.entry(plan, step)
            table = self._table_block(plan, staged, step.staged)
            if table is None:
                pack_fields(entry.targets, staged + mirrors)
                self._copy(entry.device, entry.pinned, memory.event)
                self._ring.release(index, memory.event)
            else:  # the table already lies in a pinned block: pack the rest after it, copy the block
                pack_fields(table.targets(step.staged, entry.mirror_targets), staged[1:] + mirrors)
                self._copy(entry.device, table.source(step.staged.nbytes), table.event)
                self._ring.release(index, None)  # the slot's own pinned buffer was not read
            if self.check:
                fields = entry.fresh_views()
                self._handed[index] = tuple((name, weakref.ref(t)) for name, t in fields.items())
                return fields
            return entry.fields

    def _allocate_slot(self, nbytes: int) -> tuple[_SlotMemory, np.ndarray]:
        """A ring slot's memory: one host buffer (pinned on CUDA) for the staged fields and the
        mirrors after them, and the device buffer the staged fields are copied into."""
        memory = _SlotMemory(self, nbytes)
        return memory, memory.host.numpy()

    def _lower_fresh(self, plan: LoweringPlan, step: StepLayout, values: dict[str, Any]) -> dict[str, Any]:
        """Fresh memory per lowering: a new device buffer, one pinned source, new mirrors."""
        mirror = torch.empty(step.mirrors.nbytes, dtype=torch.uint8)
        pack(step.mirrors, values, mirror.numpy())
        device = self.stage(step.staged, values)
        return _named_views(plan, device, step, mirror)

    def stage(self, layout: PackedLayout, arrays: dict[str, np.ndarray]) -> torch.Tensor:
        """Pack `arrays` at `layout`'s offsets into fresh device memory (one non_blocking copy from
        a fresh pinned buffer, which torch keeps until the copy has run); returns the uint8 buffer."""
        if self.device.type == "cpu":  # CPU tensors alias host memory: pack straight into the buffer
            device = torch.empty(layout.nbytes, dtype=torch.uint8)
            pack(layout, arrays, device.numpy())
            return device
        host = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=self._cuda)
        pack(layout, arrays, host.numpy())
        device = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        device.copy_(host, non_blocking=True)
        self.stats.copies += 1
        return device

    def _fixed_buffer(self, layout: PackedLayout) -> torch.Tensor:
        if self._fixed is None:
            self._fixed = (layout, torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device))
        elif layout != self._fixed[0]:
            raise SpecError(
                f"persistent stager: this lowering's fields have shapes {_shapes(layout)}, but the "
                f"stager's fixed addresses were laid out for {_shapes(self._fixed[0])}. Fix: pad every "
                f"batch to the same bucket (Batch(padded_num_reqs=..., padded_num_tokens=...)) and a "
                f"fixed block-table width, or keep one persistent stager per bucket."
            )
        return self._fixed[1]

    def _table_block(self, plan: LoweringPlan, staged: tuple[np.ndarray, ...], layout: PackedLayout) -> Any:
        """The pinned block holding this step's block table, when it may carry the whole step."""
        if self.table_memory is None or not staged or plan.staged[0][0] != "block_table":
            return None
        return self.table_memory.block_of(staged[0], layout.nbytes)

    def _copy(self, device: torch.Tensor, source: torch.Tensor, event: Any) -> None:
        """One non_blocking copy on the current stream; `event`, recorded after it, guards the source."""
        if not self._cuda:  # the values were packed straight into the (host) device buffer
            return
        stream = self._current.current()
        if self.check:
            if self._stream is None:
                self._stream = stream
            elif stream != self._stream:
                raise StaleLoweringError(
                    f"stager: it serves stream {self._stream}, but this lowering runs on {stream}; its "
                    f"device buffers are ordered on one stream only. Fix: one Stager per stream.")
        self._host_to_device(device, source, stream)
        event.record(stream)

    def _refuse_stale(self, index: int) -> None:
        alive = [name for name, ref in self._handed[index] if ref() is not None]
        if alive:
            held = ", ".join(alive[:4]) + (" ..." if len(alive) > 4 else "")
            raise StaleLoweringError(
                f"stager: the lowering this ring slot holds ({held}) is still referenced, and this "
                f"lowering would rewrite its memory (a stager of depth {self.depth} keeps a lowering valid "
                f"for {self.depth - 1} further lowering(s)). Fix: drop it (or .clone() what you keep) "
                f"before lowering again, or use Stager(depth={self.depth + 1}) or more.")


def _wait_for_copies(ring: SlotRing, tables: PinnedTables) -> None:
    """A dropped stager's teardown: its pinned buffers go back to torch only after their copies ran."""
    for event in [memory.event for memory in ring.owners()] + tables.events():
        if event is not None:
            event.synchronize()


class _SlotMemory:
    """One ring slot's memory (replaced whole when a step needs more) and its views per layout."""

    __slots__ = ("device", "entries", "event", "host")

    def __init__(self, stager: Stager, nbytes: int) -> None:
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=stager._cuda)
        if stager.persistent:
            self.device = stager._fixed[1]  # type: ignore[index]  # (laid out by the first lowering, before any slot)
        elif stager._cuda:
            self.device = torch.empty(nbytes, dtype=torch.uint8, device=stager.device)
        else:  # a host device: values are packed straight into the device buffer
            self.device = self.host
        self.event = torch.cuda.Event() if stager._cuda else None
        self.entries: dict[StepLayout, _Entry] = {}

    def entry(self, plan: LoweringPlan, step: StepLayout) -> _Entry:
        """This slot's views for a step layout it has not served recently."""
        if len(self.entries) > 64:  # shapes that drift step to step: keep the views of recent ones
            self.entries.clear()
        entry = self.entries[step] = _Entry(plan, self, step)
        return entry


class _Entry:
    """A slot's views for one step layout: pack targets in its host buffer, the lowered tensors."""

    __slots__ = ("device", "fields", "fresh_views", "mirror_targets", "pinned", "targets")

    def __init__(self, plan: LoweringPlan, memory: _SlotMemory, step: StepLayout) -> None:
        self.device = memory.device[: step.staged.nbytes]
        self.pinned = memory.host[: step.staged.nbytes]
        mirror = memory.host[step.mirror_offset: step.mirror_offset + step.mirrors.nbytes]
        self.mirror_targets = tuple(unpack(step.mirrors, mirror.numpy()).values())
        # on CUDA the staged fields are packed into the pinned buffer and copied; on a host device
        # straight into the device buffer (a persistent one's fixed memory)
        packed = memory.host if memory.event is not None else memory.device
        self.targets = tuple(unpack(step.staged, packed.numpy()).values()) + self.mirror_targets
        device = memory.device
        self.fresh_views: Callable[[], dict[str, Any]] = lambda: _named_views(plan, device, step, mirror)
        self.fields: dict[str, Any] = self.fresh_views()


def _named_views(plan: LoweringPlan, device: torch.Tensor, step: StepLayout, mirror: torch.Tensor) -> dict[str, Any]:
    """Lowered name -> tensor: device views of the staged layout, CPU views of the mirrors."""
    on_device = views_of(device, step.staged)
    on_host = views_of(mirror, step.mirrors)
    out = {name: on_device[f] for f, name in plan.staged}
    out.update((name, on_host[f]) for f, name in plan.mirrors)
    return out


def _shapes(layout: PackedLayout) -> dict[str, tuple[int, ...]]:
    return {e.name: e.shape for e in layout.entries}


# The fresh-memory stager of each device for `lower` without a stager, under the device
# argument as given too (resolving a device name costs more than the copy): it owns nothing
# between lowerings, so sharing it process-wide changes nothing a caller sees but its stats.
_DEFAULT_STAGERS: dict[Any, Stager] = {}


def default_stager(device: Any) -> Stager:
    """The process-wide fresh-memory (``depth=0``) stager of `device`, made on first use."""
    key = device
    if device == "cuda" if isinstance(device, str) else isinstance(device, torch.device) and str(device) == "cuda":
        key = ("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None  # the current one
    try:
        found = _DEFAULT_STAGERS.get(key) if key is not None else None
    except TypeError:  # unhashable: _as_device says what a device is
        key, found = None, None
    if found is None:
        dev = _as_device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        found = _DEFAULT_STAGERS.get(dev) or _DEFAULT_STAGERS.setdefault(dev, Stager(dev, depth=0))
        if key is not None:
            _DEFAULT_STAGERS[key] = found
    return found


@functools.cache
def _lowered_class(md_class: type) -> type[TorchLowering]:
    """The torch-side frozen dataclass of `md_class`: its lowered names, in plan order (the
    importable class of a built-in backend, else one made here)."""
    plan = plan_of(md_class)
    hints = [(name, "torch.Tensor") for _, name in plan.staged + plan.mirrors]
    hints += [(name, "int") for name in plan.scalars] + [(name, "Any") for name in plan.statics]
    declared = _DECLARED.get(f"{md_class.__module__}.{md_class.__qualname__}")
    if declared is not None and tuple(f.name for f in dataclasses.fields(declared)) == tuple(n for n, _ in hints):
        declared.__module__ = __name__  # (where users import it from)
        return declared
    # a backend registered at run time (or declarations out of date: tests/test_typing.py)
    return dataclasses.make_dataclass(
        "Torch" + md_class.__name__, hints, bases=(TorchLowering,), frozen=True, kw_only=True, eq=False,
        namespace={"__doc__": f"torch lowering of `{md_class.__name__}`: device fields are views into one "
                              "staged buffer, `*_cpu` fields are CPU tensors, ints are host scalars."},
    )


def _instance(cls: type[_T], fields: dict[str, Any]) -> _T:
    """A lowered object holding `fields` (every field of `cls`, the caller's dict adopted).

    The one place the adapter skips a frozen dataclass's generated `__init__`, which sets each
    of some thirty fields through `object.__setattr__` and costs more than the lowering's copy.
    """
    obj = object.__new__(cls)
    object.__setattr__(obj, "__dict__", fields)
    return obj


def with_fields(lowered: _T, **updates: Any) -> _T:
    """A copy of a lowered object with some of its own fields replaced (others are refused)."""
    unknown = set(updates) - set(lowered.__dict__)
    if unknown:
        raise AttributeError(f"{type(lowered).__name__} has no field(s) {sorted(unknown)}")
    return _instance(type(lowered), {**lowered.__dict__, **updates})


# --- typed overloads of lower: generated by `python tests/test_typing.py --write`; do not edit ---
@overload
def lower(md: CommonMetadata, device: Any = "cuda", *, seq_lens: torch.Tensor | None = None,
          stager: Stager | None = None, block_table: Any = None, table_updates: Any = None,
          table_view: Any = None) -> TorchCommonMetadata: ...
@overload
def lower(md: FlashInferMetadata, device: Any = "cuda", *, seq_lens: torch.Tensor | None = None,
          stager: Stager | None = None, block_table: Any = None, table_updates: Any = None,
          table_view: Any = None) -> TorchFlashInferMetadata: ...
@overload
def lower(md: FlexMetadata, device: Any = "cuda", *, seq_lens: torch.Tensor | None = None,
          stager: Stager | None = None, block_table: Any = None, table_updates: Any = None,
          table_view: Any = None) -> TorchFlexMetadata: ...
@overload
def lower(md: MambaMetadata, device: Any = "cuda", *, seq_lens: torch.Tensor | None = None,
          stager: Stager | None = None, block_table: Any = None, table_updates: Any = None,
          table_view: Any = None) -> TorchMambaMetadata: ...
@overload
def lower(md: TreeMetadata, device: Any = "cuda", *, seq_lens: torch.Tensor | None = None,
          stager: Stager | None = None, block_table: Any = None, table_updates: Any = None,
          table_view: Any = None) -> TorchTreeMetadata: ...
@overload
def lower(md: TritonMetadata, device: Any = "cuda", *, seq_lens: torch.Tensor | None = None,
          stager: Stager | None = None, block_table: Any = None, table_updates: Any = None,
          table_view: Any = None) -> TorchTritonMetadata: ...
@overload
def lower(md: TurboQuantMetadata, device: Any = "cuda", *, seq_lens: torch.Tensor | None = None,
          stager: Stager | None = None, block_table: Any = None, table_updates: Any = None,
          table_view: Any = None) -> TorchTurboQuantMetadata: ...
@overload
def lower(md: Any, device: Any = "cuda", *, seq_lens: torch.Tensor | None = None,
          stager: Stager | None = None, block_table: Any = None, table_updates: Any = None,
          table_view: Any = None) -> TorchLowering: ...
# --- end of generated overloads of lower ---
def lower(md: Any, device: Any = "cuda", *, seq_lens: torch.Tensor | None = None,
          stager: Stager | None = None, block_table: Any = None, table_updates: Any = None,
          table_view: Any = None) -> TorchLowering:
    """Lower host metadata `md` (from `attnsync.build`) to torch tensors on `device`.

    Device fields are views into one staged buffer filled by one pinned `non_blocking` copy on
    the current stream (on the CPU the values are written straight into host memory). Host
    mirrors are CPU int32 tensors, host scalars stay ints. No device value is read.

    Args:
        md: a metadata dataclass from `attnsync.build`.
        device: target device.
        seq_lens: optional exact device lengths, int32 [num_reqs] on `device`, produced on the
            GPU (async speculative decoding). They replace the staged host values, and the
            slot mapping is recomputed on the device from them (fixed-shape gathers). Required
            when the batch has inexact rows and the metadata carries a slot mapping.
        stager: whose memory the lowering uses, and for how long it stays valid (see `Stager`).
            Default: fresh memory per lowering, never rewritten. A serving loop passes its own
            `Stager(device, depth=2)` (reused memory, less host time) or a persistent one
            (fixed addresses, for CUDA graphs).
        block_table: a `TorchBlockTable` (attnsync.adapters.torch_block_table) holding the
            block table on `device`. The step's table is then not uploaded: `table_updates`
            (the step's `BlockTableState.take_updates()` record, or None when it was already
            applied) rides in the same packed copy and is applied in stream order, and
            `block_table_tensor` (and FlashInfer's `paged_kv_indices`) come from the device
            table. Needs `table_view`, the `BlockTableView` the step's `Batch` was made from.
            docs/block_table.md describes the path and its ownership.
        table_updates, table_view: see `block_table`.

    Returns:
        A frozen `Torch<MetadataClass>` with vLLM's field names (for the common backend:
        `query_start_loc`, `query_start_loc_cpu`, `seq_lens`, `seq_lens_cpu_upper_bound`,
        `block_table_tensor`, `slot_mapping` (int64), `max_query_len`, `max_seq_len`,
        `num_reqs`, `num_actual_tokens`, ...).
    """
    plan = _plan_of(md)
    stager = _stager_for(device, stager)
    values = md.__dict__
    if block_table is not None or table_updates is not None or table_view is not None:
        fields = _table_lowering.lower_with_table(plan, stager, md, seq_lens, block_table, table_updates, table_view)
    elif seq_lens is None:
        if plan.exact_slots_flag and not values["slot_mapping_exact"]:
            raise SpecError(
                "seq_lens: the batch has inexact rows (seq_lens_exact=False), so the host cannot know "
                "where their new tokens go in the cache. Fix: pass the exact device lengths, "
                "lower(md, device, seq_lens=exact_int32_cuda_tensor), and the slot mapping is "
                "recomputed on the device.")
        if "paged_kv_indices" in values:
            _table_lowering.refuse_device_indices(values)
        fields = stager.lower(plan, values)
    else:
        fields = _lower_device_lengths(plan, stager, md, _check_device_seq_lens(seq_lens, md, stager.device))
    fields = dict(fields)  # (the stager's dict is its cache: never handed out)
    fields.update(zip(plan.host_values, plan.host_values_of(values), strict=True))
    return _instance(_lowered_class(plan.md_class), fields)


def _lower_device_lengths(plan: LoweringPlan, stager: Stager, md: Any, seq_lens: torch.Tensor) -> dict[str, Any]:
    """`lower` with exact device lengths: they replace `seq_lens`, and the slots are recomputed
    from them on the device. Fresh memory (these fields are made on the device anyway); the
    token rows the slots need travel in the same single copy as the staged fields."""
    if "seq_lens" not in plan.staged_fields:
        raise SpecError(f"seq_lens: {type(md).__name__} has no seq_lens field to replace.")
    values = md.__dict__
    recompute = plan.has_slot_mapping
    arrays = {f: values[f] for f in plan.staged_fields if f != "seq_lens" and not (recompute and f == "slot_mapping")}
    if recompute:
        arrays["_token_rows"], arrays["_token_back"] = token_rows_and_back(md.query_start_loc, md.num_actual_tokens)
    layout = plan_layout([(name, a.shape, np.int32 if a.dtype.kind in "iu" else a.dtype) for name, a in arrays.items()])
    device = stager.stage(layout, arrays)
    staged = views_of(device, layout)
    staged["seq_lens"] = seq_lens
    if recompute:
        staged["slot_mapping"] = slots_from_device_lengths(
            seq_lens, staged["block_table"], staged["_token_rows"], staged["_token_back"], md.block_size)
    mirror_layout = plan.layouts(values, _WIDE).mirrors
    mirror = torch.empty(mirror_layout.nbytes, dtype=torch.uint8)
    pack(mirror_layout, values, mirror.numpy())
    host = views_of(mirror, mirror_layout)
    out = {name: staged[f] for f, name in plan.staged}
    out.update((name, host[f]) for f, name in plan.mirrors)
    return out


def slots_from_device_lengths(seq_lens: torch.Tensor, block_table: torch.Tensor, rows: torch.Tensor,
                              back: torch.Tensor, block_size: int) -> torch.Tensor:
    """Every token's slot from exact device lengths (int64 [T], -1 for padding): a token's
    position is `seq_lens[rows] - back` (`token_rows_and_back` gives both on the host)."""
    positions = seq_lens.index_select(0, rows) - back if seq_lens.shape[0] else torch.zeros_like(back)
    return device_slot_mapping(block_table, rows, positions, back > 0, block_size)


def token_rows_and_back(query_start_loc: np.ndarray, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(row of each token, its distance from its row's end) as int32 [T]; padding tokens (0, 0).

    A token's position is then `seq_len[row] - back`, which needs only the exact length."""
    tokens = np.arange(num_tokens, dtype=np.int32)
    real = tokens < query_start_loc[-1]
    rows = np.where(real, np.searchsorted(query_start_loc[1:], tokens, side="right"), 0).astype(np.int32)
    back = np.where(real, query_start_loc[np.where(real, rows + 1, 0)] - tokens, 0).astype(np.int32)
    return rows, back


def device_slot_mapping(block_table: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                        real: torch.Tensor, block_size: int) -> torch.Tensor:
    """KV-cache slot of every token on the device, int64 [T], -1 where `real` is False.

    `block_table[rows, positions // block_size] * block_size + positions % block_size`, with
    fixed shapes and gathers only (no sync); a padding token's column is clamped into its row.
    The host form is `attnsync._fields.slot_mapping`.
    """
    positions = positions.long()
    if block_table.shape[1] == 0 or block_table.shape[0] == 0:  # only padding tokens can exist
        return torch.full(positions.shape, -1, dtype=torch.int64, device=positions.device)
    column = torch.where(real, positions // block_size, 0).clamp_max(block_table.shape[1] - 1)
    pages = block_table.index_select(0, rows.long()).gather(1, column.unsqueeze(1)).squeeze(1).long()
    return torch.where(real, pages * block_size + positions % block_size, -1)


def _check_device_seq_lens(seq_lens: Any, md: Any, device: torch.device) -> torch.Tensor:
    if not isinstance(seq_lens, torch.Tensor):
        raise TypeError(f"seq_lens: expected a torch.Tensor on {device}, received {type(seq_lens).__name__}.")
    expected = (md.num_reqs,)
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != expected or seq_lens.device != device:
        raise SpecError(
            f"seq_lens: expected an int32 tensor of shape {expected} on {device} (exact lengths of "
            f"every padded row, padded rows 0), received dtype {seq_lens.dtype}, shape "
            f"{tuple(seq_lens.shape)}, device {seq_lens.device}. Fix: pass the device tensor your "
            f"runner corrected for rejected drafts, cast with .to(torch.int32).")
    return seq_lens


def _plan_of(md: Any) -> LoweringPlan:
    """The lowering plan of `md`'s class, after refusing what is not lowerable metadata."""
    cls: type = type(md)  # (typed: mypy finds type[Any] unhashable for the cache)
    try:
        plan = plan_of(cls)  # (cached per class; refuses what is not a dataclass)
    except TypeError:
        plan = None
    if plan is None or not (plan.staged or plan.mirrors):
        raise TypeError(
            f"lower: expected metadata from attnsync.build(...), received {cls.__name__}. "
            f"Fix: md = attnsync.build(batch, backend=...); lower(md, device=...).")
    if not md.__dict__.get(BUILT_MARK):
        check_lowerable(md)  # fields edited by hand (dataclasses.replace) are refused, naming the field
    return plan


def _stager_for(device: Any, stager: Stager | None) -> Stager:
    """The stager of a lowering, checked against the device asked for."""
    if stager is None:
        return default_stager(device)
    if not isinstance(stager, Stager):
        raise TypeError(f"stager: expected an attnsync.adapters.torch.Stager, received {type(stager).__name__}.")
    try:
        if device is stager.device or device in stager._accepted:
            return stager
    except TypeError:  # unhashable: _as_device says what a device is
        pass
    asked = _as_device(device)
    if asked.type != stager.device.type or (asked.index is not None and asked.index != stager.device.index):
        raise SpecError(
            f"stager: it stages to {stager.device}, but device={device!r} was asked for. Fix: pass a "
            f"Stager created for {device!r}, or leave stager=None for fresh memory.")
    if isinstance(device, str):
        stager._accepted.add(device)
    return stager


def views_of(buffer: torch.Tensor, layout: PackedLayout) -> dict[str, torch.Tensor]:
    """Typed views of every field of a staged uint8 `buffer` (one `as_strided` per field)."""
    dtypes, recipe = _view_recipe(layout)
    typed = [buffer.view(dtype) for dtype in dtypes]
    base = [t.storage_offset() for t in typed]  # as_strided's offsets count from the storage's start
    return {name: typed[i].as_strided(shape, strides, base[i] + offset) for name, i, shape, strides, offset in recipe}


@functools.lru_cache(maxsize=1024)
def _view_recipe(layout: PackedLayout) -> tuple[tuple[torch.dtype, ...], tuple[tuple[str, int, tuple[int, ...], tuple[int, ...], int], ...]]:
    """The dtypes to view a staged buffer as, and per field (name, dtype index, shape, strides,
    element offset): worked out once per layout."""
    names = list(dict.fromkeys(e.dtype for e in layout.entries))
    recipe = tuple(
        (e.name, names.index(e.dtype), e.shape, _contiguous_strides(e.shape), e.offset // np.dtype(e.dtype).itemsize)
        for e in layout.entries)
    return tuple(TORCH_DTYPES[name] for name in names), recipe


@functools.lru_cache(maxsize=1024)
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _as_device(device: Any) -> torch.device:
    """`device` as a torch.device, refusing names torch does not know and absent devices."""
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str) or (isinstance(device, int) and not isinstance(device, bool)):
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError) as exc:
            raise SpecError(f"device: {device!r} is not a torch device ({exc}). Fix: pass 'cuda', 'cuda:1' or 'cpu'.") from None
    else:
        raise TypeError(f"device: expected a torch device such as 'cuda' or 'cpu', received {type(device).__name__}.")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise SpecError(
            f"device: {str(dev)!r} is not available here ({torch.cuda.device_count()} CUDA device(s) visible). "
            f"Fix: lower to 'cpu', or run on a host with that GPU.")
    if dev.type not in ("cuda", "cpu"):
        raise SpecError(f"device: attnsync lowers to 'cuda' or 'cpu' devices, received {str(dev)!r}. "
                        f"Fix: lower to 'cpu', or to a CUDA device.")
    return dev


# --- typed overloads of lower_replicated: generated by `python tests/test_typing.py --write`; do not edit ---
@overload
def lower_replicated(md: CommonMetadata, devices: Any, *,
                     stagers: Any = None) -> tuple[TorchCommonMetadata, ...]: ...
@overload
def lower_replicated(md: FlashInferMetadata, devices: Any, *,
                     stagers: Any = None) -> tuple[TorchFlashInferMetadata, ...]: ...
@overload
def lower_replicated(md: FlexMetadata, devices: Any, *,
                     stagers: Any = None) -> tuple[TorchFlexMetadata, ...]: ...
@overload
def lower_replicated(md: MambaMetadata, devices: Any, *,
                     stagers: Any = None) -> tuple[TorchMambaMetadata, ...]: ...
@overload
def lower_replicated(md: TreeMetadata, devices: Any, *,
                     stagers: Any = None) -> tuple[TorchTreeMetadata, ...]: ...
@overload
def lower_replicated(md: TritonMetadata, devices: Any, *,
                     stagers: Any = None) -> tuple[TorchTritonMetadata, ...]: ...
@overload
def lower_replicated(md: TurboQuantMetadata, devices: Any, *,
                     stagers: Any = None) -> tuple[TorchTurboQuantMetadata, ...]: ...
@overload
def lower_replicated(md: Any, devices: Any, *,
                     stagers: Any = None) -> tuple[TorchLowering, ...]: ...
# --- end of generated overloads of lower_replicated ---
def lower_replicated(md: Any, devices: Any, *, stagers: Any = None) -> tuple[TorchLowering, ...]:
    """Lower one host metadata `md` to several devices: one pinned non_blocking copy each.

    For tensor-parallel engines, where every rank's attention reads the same metadata: build
    once on the host, then one staged copy per device, each on that device's current stream.
    Nothing is read back and no device waits for another.

    Args:
        md: a metadata dataclass from `attnsync.build`.
        devices: the target devices (`["cuda:0", "cuda:1"]`), distinct.
        stagers: optional, one `Stager` per device (default: fresh memory on each).

    Returns:
        One lowering per device, in the order of `devices`.

    Example:
        >>> import attnsync
        >>> md = attnsync.build(attnsync.Batch(query_lens=[1], seq_lens=[3], block_table=[[2]],
        ...                                    block_size=4))
        >>> [t.slot_mapping.tolist() for t in lower_replicated(md, ["cpu"])]
        [[10]]
    """
    _plan_of(md)
    targets = [_as_device(d) for d in devices]
    if not targets:
        raise SpecError("devices: expected at least one device, received none.")
    resolved = [torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d
                for d in targets]
    if len(set(resolved)) != len(resolved):
        raise SpecError(f"devices: expected distinct devices, received {[str(d) for d in targets]}.")
    if stagers is not None:
        stagers = list(stagers)
        if len(stagers) != len(targets):
            raise SpecError(f"stagers: expected one stager per device ({len(targets)}), received {len(stagers)}.")
    out = []
    for i, device in enumerate(resolved):
        # The copy runs on the target's current stream; making it current keeps torch's own
        # device guard and the event on the same device.
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            out.append(lower(md, device, stager=None if stagers is None else stagers[i]))
    return tuple(out)
