"""Lower attnsync host metadata to torch tensors with one pinned, non-blocking copy.

Importing this module imports torch: that import is the user's choice of framework.

`lower(md, device=...)` returns a frozen object with vLLM's field names: device fields are
views into one staged device buffer (one `non_blocking` copy on the current stream), host
mirrors are CPU tensors, host scalars stay Python ints. Nothing here reads a device value.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any

import numpy as np
import torch

from .._spec import array_fields, scalar_fields
from .._staging import PackedLayout, SlotRing, pack, plan_layout
from .._validate import SpecError

# The torch dtype each numpy dtype becomes; the core speaks numpy only (style lesson 13).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
    "float32": torch.float32,
}
# Fields whose device copy is wider in torch than in the host metadata: vLLM's cache-write
# kernels take int64 slot ids. The host value is int32 (validated to fit), so JAX stays int32.
_TORCH_DEVICE_DTYPE = {"slot_mapping": np.int64}


class Stager:
    """Stages packed metadata onto one device: pinned ring on CUDA, fresh buffers on CPU.

    Args:
        device: the target device (`"cuda"`, `"cuda:1"`, `"cpu"`, a `torch.device`).
        num_slots: pinned host slots in rotation (>= 2).
        persistent: write every step into the same device addresses (one device buffer kept
            for the life of the stager; the basis for CUDA graphs). Every lowering must then
            have the same layout (pad batches to a bucket); a different layout is refused
            before anything is written.

    Attributes:
        stats: `StagingStats` (copies issued, event waits, slot grows).
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

    @property
    def stats(self):  # noqa: D102 - documented in the class docstring
        return self._ring.stats

    @staticmethod
    def _allocate_pinned(nbytes: int) -> tuple[torch.Tensor, np.ndarray]:
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return host, host.numpy()

    def stage(self, layout: PackedLayout, arrays: dict[str, np.ndarray]) -> torch.Tensor:
        """Pack `arrays` and return the device uint8 buffer holding them (one copy)."""
        if self.device.type != "cuda":
            # CPU tensors alias host memory: a fresh buffer per lowering, so a later lowering
            # never rewrites tensors an earlier one returned. No copy, nothing to pin.
            buffer = np.empty(layout.nbytes, dtype=np.uint8)
            pack(layout, arrays, buffer)
            out = torch.from_numpy(buffer)
            return out if self.device.type == "cpu" else out.to(self.device)
        with self._lock:
            if self.persistent:
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
                device_buffer = self._device_buffer
            else:
                device_buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
            index, host, view = self._ring.acquire(layout.nbytes)
            pack(layout, arrays, view)
            # An H2D copy runs on the current stream of the destination's device, so the
            # event is recorded there too. One event per slot, reused: it is re-recorded only
            # after acquire() saw its previous copy complete.
            device_buffer.copy_(host[: layout.nbytes], non_blocking=True)
            event = self._events[index]
            event.record(torch.cuda.current_stream(self.device))
            self._ring.release(index, event)
            return device_buffer


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
    the current stream (on CPU: zero-copy views of a fresh host buffer). Host mirrors are CPU
    int32 tensors, host scalars stay ints. No device value is read.

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
    _check_metadata(md)
    stager = stager if stager is not None else default_stager(device)
    target = stager.device
    asked = torch.device(device)
    if asked.type != target.type or (asked.index is not None and asked.index != target.index):
        raise SpecError(
            f"stager: it stages to {target}, but device={device!r} was asked for. Fix: pass a "
            f"Stager created for {device!r}, or leave stager=None for the default one."
        )
    cls, plan = _lowered_class(type(md))
    needs_slots = hasattr(md, "slot_mapping_exact") and not md.slot_mapping_exact
    if seq_lens is not None:
        if not hasattr(md, "seq_lens"):
            raise SpecError(f"seq_lens: {type(md).__name__} has no seq_lens field to replace.")
        seq_lens = _check_device_seq_lens(seq_lens, md, target)
    elif needs_slots:
        raise SpecError(
            "seq_lens: the batch has inexact rows (seq_lens_exact=False), so the host cannot know "
            "where their new tokens go in the cache. Fix: pass the exact device lengths, "
            "lower(md, device, seq_lens=exact_int32_cuda_tensor), and the slot mapping is "
            "recomputed on the device."
        )

    staged: dict[str, np.ndarray] = {}
    fields = []
    for field_name, _, role in plan:
        if role != "device" or (field_name == "seq_lens" and seq_lens is not None):
            continue
        value = getattr(md, field_name)
        dtype = _TORCH_DEVICE_DTYPE.get(field_name, value.dtype)
        staged[field_name] = value
        fields.append((field_name, value.shape, dtype))
    recompute = seq_lens is not None and hasattr(md, "slot_mapping")
    if recompute:
        extra = _slot_mapping_inputs(md)
        staged.update(extra)
        fields.extend((k, v.shape, np.int32) for k, v in extra.items())
        del staged["slot_mapping"]
        fields = [f for f in fields if f[0] != "slot_mapping"]
    layout = _layout(tuple(fields))
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

    values: dict[str, Any] = {}
    for field_name, name, role in plan:
        if role == "device":
            values[name] = device_views[field_name]
        elif role == "host":
            # A copy: torch.from_numpy refuses to share read-only arrays without a warning,
            # and the host mirrors are small.
            values[name] = torch.from_numpy(np.array(getattr(md, field_name)))
        else:
            values[name] = getattr(md, field_name)
    return cls(**values)


def views_of(buffer: torch.Tensor, layout: PackedLayout) -> dict[str, torch.Tensor]:
    """Typed views of every field of a staged uint8 `buffer` (one `as_strided` per field)."""
    typed = {name: buffer.view(TORCH_DTYPES[name]) for name in {e.dtype for e in layout.entries}}
    views = {}
    for e in layout.entries:
        itemsize = typed[e.dtype].element_size()
        views[e.name] = typed[e.dtype].as_strided(e.shape, _contiguous_strides(e.shape), e.offset // itemsize)
    return views


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


@functools.lru_cache(maxsize=256)
def _layout(fields: tuple[tuple[str, tuple[int, ...], Any], ...]) -> PackedLayout:
    return plan_layout(fields)
