"""Lower attnsync host metadata to torch tensors with one pinned, non-blocking copy.

Importing this module imports torch: that import is the user's choice of framework.

`lower(md, device=...)` returns a frozen object with vLLM's field names: device fields are
views into one staged device buffer (one `non_blocking` copy on the current stream), host
mirrors are CPU tensors, host scalars stay Python ints. Nothing here reads a device value.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
import weakref
from typing import Any

import numpy as np
import torch

from .. import _accel
from .._spec import BUILT_MARK, array_fields, check_lowerable, fields_getter, scalar_fields
from .._staging import ALIGN_BYTES, PackedLayout, SlotRing, _round_up, pack, plan_layout, unpack
from .._validate import SpecError
from . import _cudart, _pinned_tables

# The torch dtype each numpy dtype becomes; the core speaks numpy only (style lesson 13).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
    "float32": torch.float32,
}
# Whether new CUDA stagers call the runtime directly for a reused lowering's copy (see
# _cudart); False sends them through torch (the benchmark compares both).
_USE_DIRECT_CALLS = True

# Fields whose device copy is wider in torch than in the host metadata: vLLM's cache-write
# kernels take int64 slot ids. The host value is int32 (validated to fit), so JAX stays int32.
_TORCH_DEVICE_DTYPE = {"slot_mapping": np.int64}


class Stager:
    """Stages packed metadata onto one device: pinned ring on CUDA, fresh buffers on CPU.

    `lower` through a stager reuses lowerings nothing holds any more (see `lower`): each of
    those owns its pinned buffer and device buffer, guarded by its own event, so the ring below
    serves `stage` (the JAX adapter, and lowerings with device `seq_lens`).

    Args:
        device: the target device (`"cuda"`, `"cuda:1"`, `"cpu"`, a `torch.device`).
        num_slots: pinned host slots in rotation for `stage` (>= 2).
        persistent: write every step into the same device addresses (one device buffer kept
            for the life of the stager; the basis for CUDA graphs). Every lowering must then
            have the same layout (pad batches to a bucket); a different layout is refused
            before anything is written. On the CPU the buffer is host memory that each
            lowering rewrites in place (tensors of an earlier lowering see the new values).
            See `attnsync.integrations.graphs.PersistentLowering` for one stager per bucket.

    Attributes:
        stats: `StagingStats` (copies issued, event waits, slot grows; on the CPU only the
            writes of a persistent stager are counted, as copies).
    """

    def __init__(self, device: Any = "cuda", *, num_slots: int = 2, persistent: bool = False) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if num_slots < 2:
            raise SpecError(f"num_slots: expected >= 2 (so packing overlaps the copy), received {num_slots}.")
        self.persistent = persistent
        self._device_buffer: torch.Tensor | None = None
        self._persistent_layout: PackedLayout | None = None
        self._lock = threading.Lock()
        self._streams: dict[tuple[int, int, int], torch.cuda.Stream] = {}
        self._targets: dict[tuple[int, PackedLayout], tuple[Any, torch.Tensor, tuple]] = {}
        self._device_index = self.device.index if self.device.index is not None else -1
        # Reusable lowerings (see `_Reusable`): pools of two entries used in turn, each pool
        # with room for one metadata class, dtypes and stream and a range of shapes
        # (`_pool_for`), oldest first; per family (class, dtypes, stream) newest first; and
        # per exact shapes that made a pool, that pool (one lookup a step; cleared whenever a
        # pool is forgotten, so it never holds more keys than there are pools).
        self._pools: list[list] = []
        self._families: dict[tuple, list[list]] = {}
        self._reusable: dict[tuple, list] = {}
        # Lowered name -> tensor that every reusable lowering of this stager carries instead of
        # the staged field (fixed-address outputs of a captured graph: flex_torch.CapturedBlockLists).
        self._fixed_fields: dict[str, torch.Tensor] = {}
        self._reuses = self.device.type in ("cuda", "cpu")  # device kinds `_lower_reusing` serves
        self._cuda = self.device.type == "cuda"
        # The CUDA runtime's own copy call (None: torch's copy_; see _cudart).
        self._direct = _cudart.runtime() if self._cuda and _USE_DIRECT_CALLS else None
        if self._cuda:  # a dropped stager's pinned buffers wait for their copies (see _retire)
            weakref.finalize(self, _retire_pools, self._pools).atexit = False
            _pinned_tables.install()  # large block tables of later batches go to pinned memory
        if self.device.type == "cuda":
            self._events = [torch.cuda.Event() for _ in range(num_slots)]
            self._ring = SlotRing(
                num_slots=num_slots,
                allocate=self._allocate_pinned,
                is_done=lambda event: event.query(),
                wait=lambda event: event.synchronize(),  # host waits for a 2-step-old copy only
            )
        else:
            self._ring = SlotRing(
                num_slots=num_slots, allocate=self._allocate_pinned, is_done=bool, wait=bool
            )

    def _forget_lowerings(self) -> None:
        """Drop every reusable lowering (their pinned buffers wait for pending copies)."""
        with self._lock:
            _retire_pools(self._pools)
            self._families.clear()
            self._reusable.clear()

    @property
    def stats(self):  # noqa: D102 - documented in the class docstring
        return self._ring.stats

    @staticmethod
    def _allocate_pinned(nbytes: int) -> tuple[torch.Tensor, np.ndarray]:
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return host, host.numpy()

    def _persistent_buffer(self, layout: PackedLayout) -> torch.Tensor:
        """The fixed device buffer, allocated for the first layout; a different one is refused
        here, before anything is packed or copied."""
        if self._persistent_layout is None:
            self._persistent_layout = layout
            self._device_buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        elif layout != self._persistent_layout:
            raise SpecError(
                "persistent stager: this lowering's fields have shapes "
                f"{_shapes(layout)}, but the stager's fixed addresses were laid out for "
                f"{_shapes(self._persistent_layout)}. Fix: pad every batch to the same "
                "bucket (Batch(padded_num_reqs=..., padded_num_tokens=...)) and a fixed "
                "block-table width, or keep one persistent stager per bucket."
            )
        assert self._device_buffer is not None
        return self._device_buffer

    def stage(self, layout: PackedLayout, arrays: dict[str, np.ndarray]) -> torch.Tensor:
        """Pack `arrays` and return the device uint8 buffer holding them (one copy)."""
        if self.device.type != "cuda":
            if self.persistent:
                # Fixed addresses on a host device too (tests, CPU serving): every lowering
                # rewrites the one buffer, so tensors of an earlier lowering change with it.
                with self._lock:
                    target = self._persistent_buffer(layout)
                    if self.device.type == "cpu":
                        pack(layout, arrays, target.numpy())
                    else:
                        staged = np.empty(layout.nbytes, dtype=np.uint8)
                        pack(layout, arrays, staged)
                        target.copy_(torch.from_numpy(staged))
                    self._ring.stats.copies += 1
                    return target
            # CPU tensors alias host memory: a fresh buffer per lowering, so a later lowering
            # never rewrites tensors an earlier one returned. No copy, nothing to pin.
            buffer = np.empty(layout.nbytes, dtype=np.uint8)
            pack(layout, arrays, buffer)
            out = torch.from_numpy(buffer)
            return out if self.device.type == "cpu" else out.to(self.device)
        with self._lock:
            if self.persistent:
                device_buffer = self._persistent_buffer(layout)
            else:
                device_buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
            index, host, view = self._ring.acquire(layout.nbytes)
            source, targets = self._pack_targets(index, host, view, layout)
            for name, target in targets:
                np.copyto(target, arrays[name], casting="unsafe")
            # An H2D copy runs on the current stream of the destination's device, so the
            # event is recorded there too. One event per slot, reused: it is re-recorded only
            # after acquire() saw its previous copy complete.
            device_buffer.copy_(source, non_blocking=True)
            event = self._events[index]
            event.record(self._current_stream())  # 1.0 us given the stream (run5-host-primitives.json)
            self._ring.release(index, event)
            return device_buffer

    def _stream_object(self, key: tuple[int, int, int]) -> torch.cuda.Stream:
        """The Stream object of a `_cuda_getCurrentStream` triple, made once per stream."""
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = torch.cuda.Stream(stream_id=key[0], device_index=key[1], device_type=key[2])
        return stream

    def _current_stream(self) -> torch.cuda.Stream:
        """The current stream of this stager's device, without `torch.cuda.current_stream`'s
        Python overhead (3.4 us a call on the H100 host against 0.1 us for the raw lookup:
        results/2026-11-27-h100/run5-host-primitives.json): the (id, device, type) triple is one
        C call, and its Stream object is made once per stream."""
        return self._stream_object(torch._C._cuda_getCurrentStream(self._device_index))

    def _pack_targets(
        self, index: int, host: torch.Tensor, view: np.ndarray, layout: PackedLayout
    ) -> tuple[torch.Tensor, tuple[tuple[str, np.ndarray], ...]]:
        """The pinned source tensor and per-field numpy destinations of `layout` in slot
        `index`, made once per (slot memory, layout) instead of three numpy calls per field
        per step. A grown slot has new memory, so its entries are made afresh."""
        key = (index, layout)
        cached = self._targets.get(key)
        if cached is None or cached[0] is not host:
            if len(self._targets) > 256:
                self._targets.clear()
            cached = self._targets[key] = (host, host[: layout.nbytes], _targets(layout, view))
        return cached[1], cached[2]


def _shapes(layout: PackedLayout) -> dict[str, tuple[int, ...]]:
    return {e.name: e.shape for e in layout.entries}


_STAGERS: dict[torch.device, Stager] = {}


def default_stager(device: Any) -> Stager:
    """The process-wide non-persistent stager of `device` (created on first use)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    stager = _STAGERS.get(dev)
    if stager is None:
        stager = _STAGERS[dev] = Stager(dev)
    return stager


@functools.lru_cache(maxsize=None)
def _lowered_class(md_class: type) -> tuple[type, tuple[tuple[str, str, str], ...]]:
    """The torch-side dataclass of `md_class` and its (field, name, role) plan."""
    plan = []
    hints: dict[str, Any] = {}
    for f in array_fields(md_class):
        place = f.metadata["place"]
        if place in ("device", "both"):
            name = f.metadata["device_name"] or f.name
            plan.append((f.name, name, "device"))
        if place in ("host", "both"):
            default_host = f.name if place == "host" else f"{f.name}_cpu"
            name = f.metadata["host_name"] or default_host
            plan.append((f.name, name, "host"))
    for f in scalar_fields(md_class):
        plan.append((f.name, f.name, "scalar"))
    for _, name, role in plan:
        hints[name] = "torch.Tensor" if role != "scalar" else "int"
    cls = dataclasses.make_dataclass(
        "Torch" + md_class.__name__,
        [(name, hint) for name, hint in hints.items()],
        frozen=True,
        kw_only=True,
        eq=False,
        namespace={
            "__doc__": f"torch lowering of `{md_class.__name__}`: device fields are views into one "
            "staged buffer, `*_cpu` fields are CPU tensors, ints are host scalars.",
        },
    )
    return cls, tuple(plan)


def _check_device_seq_lens(seq_lens: Any, md: Any, device: torch.device) -> torch.Tensor:
    if not isinstance(seq_lens, torch.Tensor):
        raise TypeError(f"seq_lens: expected a torch.Tensor on {device}, received {type(seq_lens).__name__}.")
    expected = (md.num_reqs,)
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != expected or seq_lens.device != device:
        raise SpecError(
            f"seq_lens: expected an int32 tensor of shape {expected} on {device} (exact lengths of "
            f"every padded row, padded rows 0), received dtype {seq_lens.dtype}, shape "
            f"{tuple(seq_lens.shape)}, device {seq_lens.device}. Fix: pass the device tensor your "
            f"runner corrected for rejected drafts, cast with .to(torch.int32)."
        )
    return seq_lens


def _slot_mapping_inputs(md: Any) -> dict[str, np.ndarray]:
    """Host arrays that let the device recompute slot_mapping from exact device seq_lens."""
    # Only query_start_loc is used, so every backend's metadata qualifies.
    qsl = md.query_start_loc
    tokens = np.arange(md.num_actual_tokens, dtype=np.int32)
    owner = np.searchsorted(qsl[1:], tokens, side="right")
    valid = tokens < qsl[-1]
    req = np.where(valid, owner, 0).astype(np.int32)
    # distance of each token from the end of its row: position = seq_len - back
    back = np.where(valid, qsl[np.where(valid, req + 1, 0)] - tokens, 0).astype(np.int32)  # in bounds when R == 0
    return {"_token_req": req, "_token_back": back}


def _device_slot_mapping(
    *, seq_lens: torch.Tensor, block_table: torch.Tensor, req: torch.Tensor, back: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Slot of each token from exact device lengths; fixed shapes, gathers only, no sync."""
    if seq_lens.shape[0] == 0:  # no rows at all: every token is padding (and row 0 does not exist)
        return torch.full(req.shape, -1, dtype=torch.int64, device=req.device)
    position = seq_lens.index_select(0, req) - back  # padding: back 0 -> any; masked below
    position = position.clamp_min(0).to(torch.int64)
    width = block_table.shape[1]
    column = torch.clamp(position // block_size, max=max(width - 1, 0))
    if width == 0:
        page = torch.zeros_like(position)
    else:
        page = block_table.index_select(0, req).gather(1, column.unsqueeze(1)).squeeze(1).to(torch.int64)
    slots = page * block_size + position % block_size
    return torch.where(back > 0, slots, torch.full_like(slots, -1))


def lower(
    md: Any,
    device: Any = "cuda",
    *,
    seq_lens: torch.Tensor | None = None,
    stager: Stager | None = None,
) -> Any:
    """Lower host metadata `md` (from `attnsync.build`) to torch tensors on `device`.

    Device fields are views into one staged buffer filled by one pinned `non_blocking` copy on
    the current stream (on CPU the values are written straight into host memory). Host mirrors
    are CPU int32 tensors, host scalars stay ints. No device value is read.

    Memory: a lowering's tensors are never rewritten while anything can still see them. Once
    nothing outside attnsync holds the lowered object, its tensors or any view or export of
    their memory, a later lowering of the same shapes on the same stream may reuse it: the
    same object comes back with the new step's values (two lowerings are used in turn, so the
    usual `tmd = lower(...)` loop reuses memory from two steps back). Writes are ordered on the
    stream after every kernel queued on the old values, as torch's caching allocator orders a
    freed block's reuse. Keep a reference (or a `.clone()`) to keep a step's values. A stager
    keeps such lowerings in up to 32 pools of two, each with a pinned and a device buffer with
    room for every field to grow by up to an eighth (at least to whole 256 bytes): steps whose
    shapes drift within that room (a decode loop's page lists, eager batches of changing size)
    share a pool, and a 33rd pool makes it forget the one it made first.
    On CUDA a reused lowering's copy calls the CUDA runtime torch loaded directly
    (`attnsync.adapters._cudart`; 2-3.5 us less host time a step on an H100 host), on the same
    stream and in the same order as torch's `copy_` would; where that runtime cannot be found,
    torch's `copy_` is used. With attnsync's compiled twin (`attnsync._accel`), a reused
    lowering's whole step (its checks, copies, the CUDA calls and the scalar fields) is one C
    call (`attnsync._native.lower_step`).

    Args:
        md: a metadata dataclass from `attnsync.build`.
        device: target device.
        seq_lens: optional exact device lengths, int32 [num_reqs] on `device`, produced on the
            GPU (async speculative decoding). They replace the staged host values, and the
            slot mapping is recomputed on the device from them (fixed-shape gathers). Required
            when the batch has inexact rows and the metadata carries a slot mapping.
        stager: staging to use (default: the process-wide stager of `device`); pass a
            `Stager(device, persistent=True)` for fixed addresses (CUDA graphs).

    Returns:
        A frozen `Torch<MetadataClass>` with vLLM's field names (for the common backend:
        `query_start_loc`, `query_start_loc_cpu`, `seq_lens`, `seq_lens_cpu_upper_bound`,
        `block_table_tensor`, `slot_mapping` (int64), `max_query_len`, `max_seq_len`,
        `num_reqs`, `num_actual_tokens`, ...).
    """
    plan = _plan_of(md)
    stager, target = _stager_for(device, stager)
    if seq_lens is not None:
        if not hasattr(md, "seq_lens"):
            raise SpecError(f"seq_lens: {type(md).__name__} has no seq_lens field to replace.")
        seq_lens = _check_device_seq_lens(seq_lens, md, target)
    elif plan.has_slot_flag and not md.slot_mapping_exact:
        raise SpecError(
            "seq_lens: the batch has inexact rows (seq_lens_exact=False), so the host cannot know "
            "where their new tokens go in the cache. Fix: pass the exact device lengths, "
            "lower(md, device, seq_lens=exact_int32_cuda_tensor), and the slot mapping is "
            "recomputed on the device."
        )

    values = md.__dict__
    if seq_lens is None and stager._reuses:
        return _lower_reusing(plan, stager, values)
    recompute = seq_lens is not None and plan.has_slot_mapping
    if seq_lens is None:
        staged = {field_name: values[field_name] for field_name in plan.device_fields}
    else:
        staged = {f: values[f] for f in plan.device_fields if f != "seq_lens" and not (recompute and f == "slot_mapping")}
        if recompute:
            staged.update(_slot_mapping_inputs(md))
    layout = _layout_of(plan, staged)
    buffer = stager.stage(layout, staged)
    device_views = views_of(buffer, layout)
    if seq_lens is not None:
        device_views["seq_lens"] = seq_lens
    if recompute:
        device_views["slot_mapping"] = _device_slot_mapping(
            seq_lens=seq_lens, block_table=device_views["block_table"],
            req=device_views["_token_req"], back=device_views["_token_back"],
            block_size=md.block_size,
        )

    out: dict[str, Any] = {name: device_views[field_name] for field_name, name in plan.device_names}
    for field_name, name in plan.host_names:
        # A copy: torch.from_numpy refuses to share read-only arrays without a warning,
        # and the host mirrors are small. astype copies and makes other integer dtypes int32.
        host = values[field_name]
        out[name] = torch.from_numpy(host.astype(np.int32) if host.dtype.kind in "iu" else host.copy())
    for name in plan.scalar_names:
        out[name] = values[name]
    lowered = object.__new__(plan.cls)  # the frozen dataclass without its slow __init__ (see
    lowered.__dict__.update(out)  # attnsync._spec.construct); every field is set just above
    return lowered


def with_fields(lowered: Any, **updates: Any) -> Any:
    """A copy of a lowered object with some fields replaced (the lowering's own fields only).

    `dataclasses.replace` would run the frozen class's generated `__init__` (7 us for 24
    fields on the H100 host, results/2026-11-27-h100/run5-host-primitives.json); this copies the
    instance dict instead, as `lower` builds it.
    """
    unknown = set(updates) - set(lowered.__dict__)
    if unknown:
        raise AttributeError(f"{type(lowered).__name__} has no field(s) {sorted(unknown)}")
    out = object.__new__(type(lowered))
    out.__dict__.update(lowered.__dict__)
    out.__dict__.update(updates)
    return out


# ----------------------------------------------------------------------------------------------
# Reusable lowerings
#
# Making a lowering's tensors costs more host time than filling them: on the H100 host one
# `as_strided` view is 1.6 us, a device `torch.empty` 2.6 us, a `from_numpy` mirror 1.4 us plus
# its copy (results/2026-11-27-h100/run5-host-primitives.json), and views of a 256-request
# lowering took 16 us of its 100 (run6-lower-profile.json). So a stager keeps pools of two
# lowerings used in turn, and writes a step's values into the older one's memory when nothing
# outside attnsync can still see it:
#
#   * no Python reference to the lowered object or to any of its tensors beyond attnsync's own
#     (`sys.getrefcount` equals what it was when the entry was last shaped), and
#   * no other tensor on the device buffer's or the mirror buffer's memory (the storage's use
#     count, `torch._C._storage_Use_Count`, is unchanged): a slice a consumer kept, a DLPack
#     export, a `with_fields` copy all raise it.
#
# If anything still holds it, the entry is replaced by a fresh one and the old memory stays
# with its holder, exactly as a fresh lowering would. The device buffer is rewritten by a copy
# on the same stream its earlier consumers were queued on (the stream is part of the pool's
# key), so their kernels have read it before the copy lands: the guarantee torch's caching
# allocator gives a freed block reused on its own stream.
#
# Shapes drift from step to step in a serving loop: FlashInfer's `paged_kv_indices` gains a
# page whenever a decode row crosses a page boundary (almost every step of a 32-request
# decode loop), and eager batches change their request and token counts. A pool is therefore
# made with room to grow (`_Room`): each field's slot holds up to an eighth more bytes than
# the step that made it needed, and a later step whose fields all fit (and are not much
# smaller, so the copy stays close to the step's size) reuses the pool, remaking only the
# views of the fields whose shape changed. Before pools had room, a 32-request FlashInfer
# decode loop on the CPU host made a fresh lowering on 281 of 300 steps (107 us a step
# against 21 us reused). A persistent stager's pools have no room: its addresses are fixed for
# one layout.


class _Room:
    """Byte offsets and capacities of every field in a pool's device and mirror buffers.

    `slots` lists the device fields (plan.device_names order) then the host mirrors
    (plan.host_names order), each as (field, lowered name, numpy dtype, offset, capacity,
    index into `plan.arrays_of(values)`, is_mirror). Offsets are 64-byte aligned (the staging
    rule 2 of DESIGN.md); the device buffer holds `device_nbytes`, the mirror buffer
    `mirror_nbytes`.
    """

    __slots__ = ("slots", "device_nbytes", "mirror_nbytes", "checks_of", "layout", "slots_of", "shapes")

    def __init__(self, plan: _Plan, arrays: tuple[np.ndarray, ...], *, grow: bool,
                 layout: PackedLayout | None = None) -> None:
        index_of = {f: i for i, f in enumerate(plan.array_names)}
        slots, ends = [], [0, 0]
        checks: list[list[tuple[int, int]]] = [[] for _ in arrays]
        # The block table is the first device field, at offset 0: a batch whose table lies in a
        # pinned block (attnsync/adapters/_pinned_tables.py) has the other fields packed after it.
        device_roles = sorted(((f, name, False) for f, name in plan.device_names), key=lambda r: r[0] != "block_table")
        roles = device_roles + [(f, name, True) for f, name in plan.host_names]
        for field_name, name, mirror in roles:
            i = index_of[field_name]
            array = arrays[i]
            if mirror:
                dtype = np.dtype(np.int32) if array.dtype.kind in "iu" else array.dtype
            else:
                wide = _TORCH_DEVICE_DTYPE.get(field_name)
                dtype = np.dtype(wide or (np.int32 if array.dtype.kind in "iu" else array.dtype))
            need = array.size * dtype.itemsize
            capacity = _with_room(need) if grow else need
            if layout is not None and not mirror:  # the persistent stager's exact layout
                offset = layout.entry(field_name).offset
            else:
                offset = ends[mirror]
            ends[mirror] = max(ends[mirror], _round_up(offset + capacity, ALIGN_BYTES))
            slots.append((field_name, name, dtype, offset, capacity, i, mirror))
            if (dtype.itemsize, capacity) not in checks[i]:  # a mirror of a device field: same check
                checks[i].append((dtype.itemsize, capacity))
        self.slots = tuple(slots)
        self.checks_of = tuple(tuple(c) for c in checks)  # per array: (itemsize, capacity) of its slots
        self.shapes = tuple([a.shape for a in arrays])  # the shapes it was made for
        # per array index, the slots showing it (a "both" field has a device slot and a mirror)
        self.slots_of = tuple(tuple(k for k, slot in enumerate(slots) if slot[5] == i)
                              for i in range(len(arrays)))
        self.device_nbytes = layout.nbytes if layout is not None else max(ends[0], ALIGN_BYTES)
        self.mirror_nbytes = max(ends[1], ALIGN_BYTES)
        self.layout = layout

    def fits(self, arrays: tuple[np.ndarray, ...], shapes: tuple[tuple[int, ...], ...]) -> bool:
        """Whether every field of a step fits its slot, and no slot is more than twice (plus
        4 KB) what its field needs: a pool made for a large batch would otherwise copy its
        whole width for every small one. Only the fields whose shape differs from the one the
        pool was made for are checked: the others fit by construction (`_with_room`)."""
        for i, (made, now) in enumerate(zip(self.shapes, shapes)):
            if made != now:
                for itemsize, capacity in self.checks_of[i]:
                    need = arrays[i].size * itemsize
                    if need > capacity or capacity > 2 * need + 4096:
                        return False
        return True


def _with_room(nbytes: int) -> int:
    """`nbytes` rounded up to whole 256 bytes up to 2 KB (small fields: their copy costs the
    same), beyond that to the next size of the form m * 2**k with 8 <= m < 16 (at most an
    eighth more)."""
    if nbytes <= 2048:
        return _round_up(max(nbytes, 1), 256)
    step = 1 << (nbytes.bit_length() - 4)
    return _round_up(nbytes, step)


class _Reusable:
    """One lowering whose memory a later lowering of its pool may rewrite.

    On CUDA it also owns the pinned host buffer its values are packed into and the event
    recorded after that buffer's copy: the buffer is rewritten only once the event has
    completed (the slot-ring guard of `attnsync._staging`, per entry, so a step needs no ring
    lookups: under the line profiler on the H100 host, `acquire`, `release` and the pack-target
    lookup took longer than the copy itself, results/2026-11-27-h100/run13-lineprof.txt).
    """

    __slots__ = ("lowered", "held", "watched", "storages", "baseline", "device_buffer", "num_staged",
                 "pinned", "event", "stream", "copy_args", "room", "shapes",
                 "views", "host", "typed", "mirror_typed", "mirror_host", "replaced", "tensor_names",
                 "pack_pairs", "pack_targets", "pack_sources", "pack_index", "fast", "table_first")

    def __init__(self, plan: _Plan, stager: Stager, room: _Room, arrays: tuple[np.ndarray, ...],
                 stream: tuple[int, int, int] | None) -> None:
        self.room = room
        if stager.persistent:
            assert room.layout is not None
            self.device_buffer = stager._persistent_buffer(room.layout)  # refuses another layout, unwritten
        else:
            self.device_buffer = torch.empty(room.device_nbytes, dtype=torch.uint8, device=stager.device)
        if stager.device.type == "cuda":
            self.pinned = torch.empty(room.device_nbytes, dtype=torch.uint8, pin_memory=True)
            self.event = torch.cuda.Event()
            self.stream = stager._stream_object(stream)  # the stream is part of the pool's key
            self.host = self.pinned.numpy()
            # the direct copy's arguments (see _cudart): this entry's fixed memory and stream
            self.copy_args = (self.device_buffer.data_ptr(), self.pinned.data_ptr(), room.device_nbytes,
                              self.stream.cuda_stream)
            # torch creates an event when it first records it; the compiled step (`fast`) needs its
            # handle from the start. Recorded on the entry's stream, where this step's copy goes
            # next: the caller does not wait for this record (nothing was copied from the entry yet).
            self.event.record(self.stream)
        else:  # the device buffer is host memory: values are packed straight into it
            self.pinned = self.event = self.stream = self.copy_args = None
            self.host = self.device_buffer.numpy()
        mirror_buffer = torch.empty(room.mirror_nbytes, dtype=torch.uint8)
        self.mirror_host = mirror_buffer.numpy()
        dtypes = {slot[2] for slot in room.slots}
        self.typed = {d: self.device_buffer.view(TORCH_DTYPES[d.name]) for d in dtypes}
        self.mirror_typed = {d: mirror_buffer.view(TORCH_DTYPES[d.name]) for d in dtypes}
        # fields a fixed tensor replaces (see Stager._fixed_fields) are not worth packing
        self.replaced = frozenset(stager._fixed_fields)
        self.lowered = object.__new__(plan.cls)  # see `lower` on skipping the frozen __init__
        self.lowered.__dict__.update(stager._fixed_fields)
        self.tensor_names = tuple(slot[1] for slot in room.slots) + tuple(
            name for name in stager._fixed_fields if name not in {slot[1] for slot in room.slots})
        self.views: list[Any] = [None] * len(room.slots)  # per slot: (tensor, numpy target)
        self.shapes: tuple = ()  # () until the first reshape makes every view
        self.reshape(tuple([a.shape for a in arrays]))
        # A persistent stager's buffer is shared by every lowering it made (that is its point),
        # so only the mirrors' memory is watched there.
        # The watched tensors are kept: the storage pointers below must outlive every check even
        # if no view of a buffer survives (it adds no storage use: the tensors exist already).
        self.watched = (mirror_buffer,) if stager.persistent else (self.device_buffer, mirror_buffer)
        self.storages = tuple(t.untyped_storage()._cdata for t in self.watched)
        self.baseline = -1  # set by `rebaseline` once this constructor's locals are gone
        self.fast: tuple | None = None

    def rebaseline(self, plan: _Plan, stager: Stager) -> None:
        """Take the users count of a lowering that only attnsync holds (its constructor's locals
        gone, or its lists just remade) as the baseline, and make the compiled step's `fast`
        tuple where attnsync._native is in use: the same objects the Python step reads (the
        lists by reference, so a reshape that keeps them keeps the tuple), and the CUDA calls'
        addresses and arguments. The compiled step takes its own count (its offsets differ
        from `sys.getrefcount`'s), always taken here next to `baseline`."""
        native = _accel.native
        self.fast = None
        direct = stager._direct
        # (a compiled module without the whole-step functions: the Python step runs)
        if (native is not None and hasattr(native, "lower_step")
                and (not stager._cuda or (direct is not None and direct.addresses))):
            cuda = None
            if stager._cuda:
                cuda = direct.addresses + self.copy_args[:3] + (
                    self.stream.cuda_stream, self.event.cuda_event, stager._device_index)
            self.fast = (self.lowered, self.held, self.storages, _storage_use_count, [0], self.pack_targets,
                         tuple(name for name, _ in self.pack_pairs), plan.scalar_names, self.lowered.__dict__,
                         cuda)
        self.baseline = self.users()
        if self.fast is not None:
            self.fast[4][0] = native.lower_users(self.fast)

    def reshape(self, shapes: tuple[tuple[int, ...], ...]) -> bool:
        """Give each field the shape of this step (`shapes`: of `plan.arrays_of(values)`),
        remaking only the views whose shape changed.

        `pack_pairs` lists (field, numpy view) of the non-empty fields to pack, the staged ones
        (`num_staged`) then the host mirrors, and `pack_targets` the same views (a field that
        turns empty or non-empty remakes both); `held` lists every tensor of the lowering, slot
        by slot, then the fixed fields.
        Returns True when it remade the lists: the caller then resets `baseline`. Otherwise
        each new view took its predecessor's place in the lowering's dict, `held`, `views` and
        the lists (the same references and one storage use, as before), so `users()` is what
        it was and the baseline stands (tests/adapters/test_torch.py checks this after every
        step of a drifting loop).
        """
        old = self.shapes
        views = self.views
        fields = self.lowered.__dict__
        slots = self.room.slots
        if old:
            slots_of = self.room.slots_of
            redo = [k for i, (was, now) in enumerate(zip(old, shapes)) if was != now for k in slots_of[i]]
        else:
            redo = range(len(slots))
        remade = not old
        for k in redo:
            _, name, dtype, offset, _, i, mirror = slots[k]
            shape = shapes[i]
            typed = (self.mirror_typed if mirror else self.typed)[dtype]
            tensor = typed.as_strided(shape, _contiguous_strides(shape), offset // dtype.itemsize)
            target = np.ndarray(shape, dtype, self.mirror_host if mirror else self.host, offset)
            if old and (views[k][1].size == 0) != (target.size == 0):
                remade = True
            views[k] = (tensor, target)
            if mirror or name not in self.replaced:
                fields[name] = tensor
        self.shapes = shapes
        if remade:
            staged = [(slots[k][0], views[k][1]) for k in range(len(slots))
                      if not slots[k][6] and views[k][1].size and slots[k][1] not in self.replaced]
            mirrors = [(slots[k][0], views[k][1]) for k in range(len(slots))
                       if slots[k][6] and views[k][1].size]
            self.held = [fields[name] for name in self.tensor_names]
            # what one compiled `pack` call fills (attnsync/_accel.py): staged fields, then mirrors
            self.num_staged = len(staged)
            self.pack_pairs = staged + mirrors
            self.pack_targets = [view for _, view in self.pack_pairs]
            self.pack_sources = fields_getter(tuple(name for name, _ in self.pack_pairs))
            # where each slot sits in those lists (-1: not packed)
            position = {id(view): j for j, (_, view) in enumerate(self.pack_pairs)}
            self.pack_index = [position.get(id(views[k][1]), -1) for k in range(len(slots))]
            # Whether a pinned table can stand in for the block table (see _lower_reusing): it is
            # the first staged field, at the start of a CUDA entry's buffer (_Room puts it there;
            # a persistent stager's fixed layout may not).
            self.table_first = (self.copy_args is not None and bool(staged) and staged[0][0] == "block_table"
                                and slots[0][3] == 0)
            return True
        pairs, packed, held, index = self.pack_pairs, self.pack_targets, self.held, self.pack_index
        for k in redo:
            j = index[k]
            held[k] = fields[slots[k][1]]
            if j >= 0:
                pairs[j] = (slots[k][0], views[k][1])
                packed[j] = views[k][1]
        return False

    @property
    def targets(self) -> list[tuple[str, np.ndarray]]:
        """(field, numpy view) of the staged fields a step packs (the pinned buffer on CUDA)."""
        return self.pack_pairs[: self.num_staged]

    def users(self) -> int:
        """References to the lowering and its tensors plus users of its memory (see above).

        Each term is at least its value when the entry was last shaped (attnsync's own
        references), so the sum equals that baseline exactly when every term does: one
        comparison.
        """
        return (sys.getrefcount(self.lowered) + sum(map(sys.getrefcount, self.held))
                + sum(map(_storage_use_count, self.storages)))


_storage_use_count = torch._C._storage_Use_Count
_current_stream_key = getattr(torch._C, "_cuda_getCurrentStream", None)  # absent from CPU builds
# The C methods under torch.cuda.Event's Python wrappers (absent from CPU builds of torch,
# where no CUDA stager exists to call them).
_event_query = getattr(getattr(torch._C, "_CudaEventBase", None), "query", None)
_event_record = getattr(getattr(torch._C, "_CudaEventBase", None), "record", None)


def _targets(layout: PackedLayout, host: np.ndarray) -> tuple[tuple[str, np.ndarray], ...]:
    """(field, numpy view) of every non-empty field of `layout` in the uint8 array `host`."""
    return tuple((e.name, view) for e, view in zip(layout.entries, unpack(layout, host).values()) if e.nbytes)


_REUSABLE_KEYS = 32  # pools kept per stager; a 33rd makes it forget the one it made first

# Pinned buffers of dropped CUDA entries whose last copy may not have read them yet, with the
# event recorded after that copy. torch's pinned allocator hands a freed buffer out again at
# once unless a copy it issued itself is pending; the direct runtime copies (see _cudart) are
# not its own, so a dropped entry's buffer is kept here until its event completes. Pruned
# whenever an entry is dropped (a rare step: a pool forgotten, or a lowering still held).
_RETIRED: list[tuple[torch.cuda.Event, torch.Tensor]] = []
_RETIRED_LOCK = threading.Lock()


def _retire(entries: Any) -> None:
    """Keep the pinned buffers of `entries` (being dropped) until their last copies are done."""
    with _RETIRED_LOCK:
        _RETIRED[:] = [item for item in _RETIRED if not item[0].query()]
        _RETIRED.extend((entry.event, entry.pinned) for entry in entries
                        if entry is not None and entry.event is not None and not entry.event.query())


def _retire_pools(pools: list[list]) -> None:
    """Retire every entry of a stager's reusable pools and forget them."""
    for pool in pools:
        _retire(pool[1:3])
    pools.clear()


def _pool_for(plan: _Plan, stager: Stager, key: tuple, family: tuple, arrays: tuple[np.ndarray, ...],
              shapes: tuple[tuple[int, ...], ...]) -> list:
    """The pool for a step whose exact shapes were not seen yet: one of its family (same
    metadata class, dtypes and stream) that it fits, else a new one with room to grow."""
    pools = stager._families.setdefault(family, [])
    if not stager.persistent:
        for pool in pools:  # newest first
            if pool[3].fits(arrays, shapes):
                # Not remembered under these exact shapes: in a decode loop they never come
                # back (FlashInfer's page count grows), and checking the newest pool costs
                # less than hashing the key into the lookup.
                return pool
        room = _Room(plan, arrays, grow=True)
    else:  # fixed addresses: one exact layout (a different one is refused when allocated)
        staged = dict(zip(plan.device_fields, arrays))
        room = _Room(plan, arrays, grow=False, layout=_layout_of(plan, staged))
    if len(stager._pools) >= _REUSABLE_KEYS:  # forget the oldest pool
        oldest = stager._pools.pop(0)
        _retire(oldest[1:3])
        for members in stager._families.values():
            if oldest in members:
                members.remove(oldest)
        stager._reusable.clear()
    pool = [2, None, None, room]  # [last turn, entry, entry, room]
    stager._pools.append(pool)
    pools.insert(0, pool)
    stager._reusable[key] = pool
    return pool


def _lower_reusing(plan: _Plan, stager: Stager, values: dict[str, Any]) -> Any:
    """`lower` without device `seq_lens` on a CUDA or CPU stager, reusing a free lowering.

    Written for few Python steps: on the H100 host each line costs about a microsecond
    (results/2026-11-27-h100/run15-prof4.json: the lowering's own calls add up to two
    thirds of its time, the rest is interpreter overhead).
    """
    arrays = plan.arrays_of(values)
    cuda = stager._cuda
    stream = _current_stream_key(stager._device_index) if cuda else None
    shapes = tuple([a.shape for a in arrays])
    # Built metadata's dtypes follow from its class (int32, bool, float32 per field); edited
    # metadata may hold others, which change the layout.
    dtypes = None if values.get(BUILT_MARK) else tuple([a.dtype for a in arrays])
    key = (plan, shapes, dtypes, stream)
    with stager._lock:
        pool = stager._reusable.get(key)
        if pool is None:
            pool = _pool_for(plan, stager, key, (plan, dtypes, stream), arrays, shapes)
        turn = pool[0] = 3 - pool[0]
        entry = pool[turn]
        native = _accel.native
        # The whole step in one compiled call where it can (attnsync._native.lower_step: the
        # checks, pack, copy, event record and scalars below, in that order; a step whose
        # shapes drifted within the pool's room is reshaped first); -1: the entry is held or
        # its copy pending, and nothing was done; k >= 0: k fields packed, the rest below.
        done = -1
        if native is not None and entry is not None and entry.fast is not None:
            # (reshaped only when nothing outside holds it: the same check as below)
            if (entry.shapes != shapes and native.lower_users(entry.fast) == entry.fast[4][0]
                    and entry.reshape(shapes)):
                entry.rebaseline(plan, stager)  # a field turned empty or non-empty: lists remade
            if entry.shapes == shapes:
                tables = _pinned_tables.POOL
                if tables is not None and entry.table_first:
                    # A table in a pinned block: pack the other fields after it, copy the block
                    # (one copy still; the table is not written again). Under the pool's lock:
                    # another stager may be lowering the same batch.
                    with tables.lock:
                        block = tables.block_of(arrays[plan.table_index], entry.copy_args[2])
                        if block is not None:
                            done = native.lower_step(entry.fast, values, (
                                block.address, block.capacity, entry.num_staged, 0))  # the table: pair 0
                            if done == -2:
                                tables.copied(block, entry.stream, stager._device_index)
                if done == -1:  # no such block, or it declined: the entry's own buffer
                    done = native.lower_step(entry.fast, values)
            if done == -2:
                if cuda or stager.persistent:
                    stager._ring.stats.copies += 1
                return entry.lowered
        if done == -1:
            fresh = entry is None or entry.users() != entry.baseline
            if fresh:
                if entry is not None:
                    _retire((entry,))  # held by the caller: its pinned buffer may still be in a copy
                entry = pool[turn] = _Reusable(plan, stager, pool[3], arrays, stream)
                entry.rebaseline(plan, stager)
            elif entry.shapes != shapes and entry.reshape(shapes):
                entry.rebaseline(plan, stager)  # a field turned empty or non-empty: lists remade
            # Wait while its last copy may not have read the pinned buffer yet; not for a fresh
            # entry, never copied from (its constructor recorded the event behind whatever the
            # stream has queued, which this step need not wait for).
            if cuda and not fresh and not _event_query(entry.event):
                stager._ring.stats.event_waits += 1
                entry.event.synchronize()
            # Staged fields (into the pinned buffer on CUDA, the buffer itself on the CPU) and host
            # mirrors: one compiled call where attnsync._native is in use, numpy for what it leaves.
            done = native.pack(entry.pack_targets, entry.pack_sources(values)) if native is not None else 0
        for name, target in entry.pack_pairs[done:]:
            np.copyto(target, values[name], casting="unsafe")
        if cuda:
            direct = stager._direct
            # The runtime call under torch's copy_ (see _cudart), only with the stager's device
            # current: the default stream's handle is 0, which the runtime reads as the
            # *current* device's default stream, so lowering to cuda:1 from cuda:0 (what
            # lower_replicated does) would queue the copy on cuda:0's stream, unordered with
            # cuda:1's kernels. torch's copy_ sets a device guard itself.
            if direct and _current_cuda_device() == stager._device_index:
                direct.copy_to_device(*entry.copy_args)
            else:
                entry.device_buffer.copy_(entry.pinned, non_blocking=True)
            # torch's own C methods for the event: as cheap as ctypes calls (run26-prof8.json)
            _event_record(entry.event, entry.stream)
        if cuda or stager.persistent:  # (a CPU stager counts only its persistent writes, as `stage`)
            stager._ring.stats.copies += 1
        lowered = entry.lowered
        lowered.__dict__.update(zip(plan.scalar_names, plan.scalars_of(values)))
        return lowered


class _Plan:
    """How one metadata class lowers: its torch class and which fields go where (made once)."""

    def __init__(self, md_class: type) -> None:
        self.cls, plan = _lowered_class(md_class)
        self.device_names = tuple((f, name) for f, name, role in plan if role == "device")
        self.host_names = tuple((f, name) for f, name, role in plan if role == "host")
        self.scalar_names = tuple(name for _, name, role in plan if role == "scalar")
        self.scalars_of = fields_getter(self.scalar_names)
        self.device_fields = tuple(f for f, _ in self.device_names)
        # every array a lowering reads, in this order: the key of reusable lowerings
        self.array_names = self.device_fields + tuple(
            f for f, _ in self.host_names if f not in self.device_fields)
        self.arrays_of = fields_getter(self.array_names)
        # the block table among those arrays, where it is staged (-1: not a device field)
        self.table_index = self.array_names.index("block_table") if "block_table" in self.device_fields else -1
        names = {f.name for f in dataclasses.fields(md_class)}
        self.has_slot_flag = "slot_mapping_exact" in names
        self.has_slot_mapping = "slot_mapping" in names
        self.layouts: dict[tuple, PackedLayout] = {}


_PLANS: dict[type, _Plan] = {}


def _plan_of(md: Any) -> _Plan:
    """The lowering plan of `md`'s class, after refusing what is not lowerable metadata."""
    plan = _PLANS.get(type(md))
    if plan is None:
        if isinstance(md, type) or not _is_metadata_class(type(md)):
            raise TypeError(
                f"lower: expected metadata from attnsync.build(...), received {type(md).__name__}. "
                f"Fix: md = attnsync.build(batch, backend=...); lower(md, device=...)."
            )
        plan = _PLANS[type(md)] = _Plan(type(md))
    if not md.__dict__.get(BUILT_MARK):  # what check_lowerable trusts, without the call
        check_lowerable(md)  # fields edited by hand (dataclasses.replace) are refused, naming the field
    return plan


def _layout_of(plan: _Plan, staged: dict[str, np.ndarray]) -> PackedLayout:
    """The packed layout of these fields' shapes (one dict lookup once seen)."""
    key = tuple((name, value.shape, value.dtype.kind) for name, value in staged.items())
    layout = plan.layouts.get(key)
    if layout is None:
        if len(plan.layouts) > 1024:
            plan.layouts.clear()
        # integer fields are int32 (check_lowerable refused values that do not fit), except
        # the fields whose torch copy is wider
        fields = tuple(
            (name, value.shape, _TORCH_DEVICE_DTYPE.get(name, np.int32 if value.dtype.kind in "iu" else value.dtype))
            for name, value in staged.items()
        )
        layout = plan.layouts[key] = plan_layout(fields)
    return layout


_RESOLVED: dict[Any, tuple[Stager, torch.device]] = {}
_current_cuda_device = getattr(torch._C, "_cuda_getDevice", None)  # absent from CPU builds
_CUDA_UP = False


def _stager_for(device: Any, stager: Stager | None) -> tuple[Stager, torch.device]:
    """The stager and target device of a lowering, checked against each other.

    The default stager of a device argument seen before is one dict lookup: resolving and
    checking a device name costs several microseconds per step otherwise. "cuda" without an
    index means the current device, so its key includes the current device index.
    """
    global _CUDA_UP
    if stager is None:
        key = device
        if (isinstance(device, str) and device == "cuda") or (
            isinstance(device, torch.device) and device.type == "cuda" and device.index is None
        ):
            try:
                # the raw C lookup once CUDA is up (torch.cuda.current_device() re-checks lazy
                # initialisation in Python every call); the first call goes the long way
                key = ("cuda", _current_cuda_device() if _CUDA_UP else torch.cuda.current_device())
            except (AssertionError, RuntimeError, AttributeError):  # no CUDA here: _as_device explains
                key = None
        try:
            resolved = _RESOLVED.get(key) if key is not None else None
        except TypeError:  # unhashable: _as_device says what a device is
            key, resolved = None, None
        if resolved is None:
            stager = default_stager(_as_device(device))
            resolved = (stager, stager.device)
            if key is not None:
                _RESOLVED[key] = resolved
            if stager.device.type == "cuda":
                _CUDA_UP = _current_cuda_device is not None  # torch.cuda initialised it by now
        return resolved
    target = stager.device
    if device is target:  # the stager's own device object (what graph helpers pass): nothing to check
        return stager, target
    asked = _as_device(device)
    if asked.type != target.type or (asked.index is not None and asked.index != target.index):
        raise SpecError(
            f"stager: it stages to {target}, but device={device!r} was asked for. Fix: pass a "
            f"Stager created for {device!r}, or leave stager=None for the default one."
        )
    return stager, target


def views_of(buffer: torch.Tensor, layout: PackedLayout) -> dict[str, torch.Tensor]:
    """Typed views of every field of a staged uint8 `buffer` (one `as_strided` per field)."""
    dtypes, recipe = _view_recipe(layout)
    typed = [buffer.view(dtype) for dtype in dtypes]
    return {name: typed[i].as_strided(shape, strides, offset) for name, i, shape, strides, offset in recipe}


@functools.lru_cache(maxsize=1024)
def _view_recipe(layout: PackedLayout) -> tuple[tuple[torch.dtype, ...], tuple[tuple[str, int, tuple, tuple, int], ...]]:
    """The dtypes to view a staged buffer as, and per field (name, dtype index, shape,
    strides, element offset): worked out once per layout rather than per lowering."""
    names = sorted({e.dtype for e in layout.entries}, key=[e.dtype for e in layout.entries].index)
    dtypes = tuple(TORCH_DTYPES[name] for name in names)
    recipe = tuple(
        (e.name, names.index(e.dtype), e.shape, _contiguous_strides(e.shape), e.offset // np.dtype(e.dtype).itemsize)
        for e in layout.entries
    )
    return dtypes, recipe


@functools.lru_cache(maxsize=1024)
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


@functools.lru_cache(maxsize=None)
def _is_metadata_class(cls: type) -> bool:
    return dataclasses.is_dataclass(cls) and bool(array_fields(cls))


def _check_metadata(md: Any) -> None:
    if isinstance(md, type) or not _is_metadata_class(type(md)):
        raise TypeError(
            f"lower: expected metadata from attnsync.build(...), received {type(md).__name__}. "
            f"Fix: md = attnsync.build(batch, backend=...); lower(md, device=...)."
        )
    check_lowerable(md)  # fields edited by hand (dataclasses.replace) are refused, naming the field


def _as_device(device: Any) -> torch.device:
    """`device` as a torch.device, refusing names torch does not know and absent CUDA devices."""
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
            f"Fix: lower to 'cpu', or run on a host with that GPU."
        )
    return dev


def lower_replicated(md: Any, devices: Any, *, stagers: Any = None) -> tuple[Any, ...]:
    """Lower one host metadata `md` to several devices: one pinned non_blocking copy each.

    For tensor-parallel engines, where every rank's attention reads the same metadata: build
    once on the host, then one staged copy per device, each on that device's current stream.
    Nothing is read back and no device waits for another.

    Args:
        md: a metadata dataclass from `attnsync.build`.
        devices: the target devices (`["cuda:0", "cuda:1"]`), distinct.
        stagers: optional, one `Stager` per device (default: each device's process-wide one).

    Returns:
        One lowering per device, in the order of `devices`.

    Example:
        >>> import attnsync
        >>> md = attnsync.build(attnsync.Batch(query_lens=[1], seq_lens=[3], block_table=[[2]],
        ...                                    block_size=4))
        >>> [t.slot_mapping.tolist() for t in lower_replicated(md, ["cpu"])]
        [[10]]
    """
    _check_metadata(md)
    targets = [torch.device(d) for d in devices]
    if not targets:
        raise SpecError("devices: expected at least one device, received none.")
    resolved = [
        torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d
        for d in targets
    ]
    if len(set(resolved)) != len(resolved):
        raise SpecError(f"devices: expected distinct devices, received {[str(d) for d in targets]}.")
    if stagers is not None:
        stagers = list(stagers)
        if len(stagers) != len(targets):
            raise SpecError(
                f"stagers: expected one stager per device ({len(targets)}), received {len(stagers)}."
            )
    return tuple(
        lower(md, device, stager=None if stagers is None else stagers[i]) for i, device in enumerate(resolved)
    )

