"""The ``tree`` backend: tree attention for speculative decoding.

A speculative token tree is a set of paths from an implicit root. Path ``(a, b, c)`` is the
``c``-th candidate after the ``b``-th candidate after the ``a``-th candidate drafted after the
root (the last verified token). Each decode row of the batch carries the root plus drafted
nodes, and a drafted node may attend only to the context before the draft block, to the root,
to its own ancestors and to itself. That visibility is the additive *tree bias*, a float32
``[L, L]`` matrix (``L`` = number of paths + 1 for the root): 0 where visible, ``-inf``
elsewhere.

Node order. Node ``k >= 1`` of the bias (and token ``k`` of a decode row's draft block) is the
``k``-th path in (depth, path) order: breadth first, lexicographic within a depth, the order
speculative-decoding trees use everywhere (EAGLE, Medusa and vLLM's config sort their paths
this way). Any input order is accepted and gives the same tree; `parse_speculative_token_tree`
returns the canonical order, so a drafter can lay out its tokens the same way. In this order
every node's ancestors come before it, so the first ``q`` nodes of the tree (root included)
are always a tree of their own: a decode row with ``q < L`` query tokens is well defined.

What the builder computes on the host, per step (numpy only, no device value read):

- the common fields (`build_common` with ``decode_threshold = L``), copied by reference;
- the decode/prefill split: decode rows (``query_len <= L``, not prefilling) must come first
  (`attnsync.reorder(batch, decode_threshold=L)` puts them there), everything after them is
  the prefill sub-batch (short and long extends and fresh prefills, all attended causally);
- the prefill sub-batch's ``query_start_loc`` rebased to 0 (vLLM subtracted on the GPU);
- the four sub-batch maxima that vLLM read back with ``.max().item()`` every step (four
  device-to-host syncs inside the first layer's forward): ``max_decode_query_len`` and
  ``max_prefill_query_len`` from the exact host ``query_start_loc``, and
  ``max_decode_seq_len`` and ``max_prefill_seq_len`` from the host ``seq_lens``. The latter
  are exact for exact rows; for a row marked inexact (a decode row under async speculative
  decoding, whose host length assumes every draft of the previous step was accepted) the
  host value is an upper bound, too large by at most the number of rejected drafts. A kernel
  uses these maxima only to size grids and key loops and reads each row's exact length from
  the device ``seq_lens``, so an upper bound is all it needs.

Options:
    speculative_token_tree: the tree, as vLLM's ``speculative_token_tree`` string (for example
        ``"[(0,), (1,), (0, 0), (0, 1)]"``, parsed with `ast.literal_eval`, never `eval`) or as a
        sequence of paths (tuples or lists of non-negative ints). Default ``[(0,)]``: one draft
        token, vLLM's default. Checked: at least one path, no empty path, no duplicates, every
        path's parent present, child indices non-negative ints.
    draft_index: ``None`` (default) for the verification step. For the drafter's steps
        (vLLM's ``build_for_drafting``): ``0`` gives an empty ``[0, 0]`` bias (the first draft
        step attends causally), ``d >= 1`` the sub-square ``bias[1 : 1 + max_query_len,
        1 : 1 + max_query_len]`` of the full bias (root excluded; clipped at ``L - 1`` like a
        slice).

Example:
    >>> import attnsync
    >>> batch = attnsync.Batch(query_lens=[3, 5], seq_lens=[10, 5], block_table=[[1], [2]],
    ...                        block_size=16)
    >>> md = attnsync.build(batch, backend="tree", speculative_token_tree="[(0,), (1,), (0, 0)]")
    >>> md.tree_size, md.num_decodes, md.prefill_query_start_loc.tolist()
    (4, 1, [0, 5])
    >>> md.max_decode_query_len, md.max_prefill_query_len, md.max_decode_seq_len
    (3, 5, 10)
"""

from __future__ import annotations

import ast
import functools
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._batch import Batch, require_decode_first
from .._spec import array_field, build_common, inherit
from .._validate import SpecError, as_int, freeze

__all__ = ["TreeMetadata", "build", "parse_speculative_token_tree", "tree_attention_bias"]

DEFAULT_TREE: tuple[tuple[int, ...], ...] = ((0,),)  # one draft token after the root (vLLM's default)

Path = tuple[int, ...]


@dataclass(frozen=True, kw_only=True, eq=False)
class TreeMetadata:
    """Metadata of tree attention: a decode sub-batch with the tree bias, a causal prefill one.

    R is `num_reqs` (padded rows), T `num_actual_tokens` (padded tokens), L `tree_size`, B the
    bias size (L, or less when drafting). Decode rows are rows ``[0, num_decodes)`` and tokens
    ``[0, num_decode_tokens)``; the prefill sub-batch is rows ``[num_decodes, num_decodes +
    num_prefills)`` and tokens ``[num_decode_tokens, num_decode_tokens + num_prefill_tokens)``
    (padding rows and tokens follow). Slice the common device arrays with these host ints to
    get each sub-batch (a view, no sync); only the prefill ``query_start_loc`` needs its own
    array, because it is rebased to 0.

    Attributes:
        query_start_loc: [R+1] int32, non-decreasing, [0] == 0. Device and host
            (``query_start_loc_cpu``). The decode sub-batch's is ``[: num_decodes + 1]``.
        seq_lens: [R] int32, exact or an upper bound (see `CommonMetadata`). Device, and host
            ``seq_lens_cpu_upper_bound``.
        block_table: [R, W] int32 page ids, padded rows 0. Device.
        slot_mapping: [T] int32 (int64 in torch), -1 for padding. Device.
        tree_attn_bias: [B, B] float32, 0 where node i sees node j (diagonal, root column,
            ancestors), ``-inf`` elsewhere; [0, 0] at ``draft_index == 0``. Read-only and
            shared between builds of the same tree. Device (float32 in torch and JAX).
        prefill_query_start_loc: [R - num_decodes + 1] int32, ``query_start_loc[num_decodes:]
            - query_start_loc[num_decodes]`` (padding rows repeat the last value). Device and
            host (``prefill_query_start_loc_cpu``).
        num_reqs, num_actual_tokens, max_query_len, max_seq_len, block_size: as in
            `CommonMetadata` (``max_seq_len`` is a bound).
        tree_size: L, nodes of the tree including the root; also the decode threshold.
        draft_index: None for the verification step, else the drafting step it was built for.
        num_decodes, num_decode_tokens: decode rows and their tokens.
        num_prefills, num_prefill_tokens: the other real rows (extends and prefills) and tokens.
        max_decode_query_len: longest decode query (exact; <= L), 0 without decodes.
        max_decode_seq_len: longest host ``seq_lens`` over the decode rows: exact for exact
            rows, an upper bound for inexact ones (enough for a kernel bound), 0 without decodes.
        max_prefill_query_len: longest prefill-sub-batch query (exact), 0 without prefills.
        max_prefill_seq_len: longest host ``seq_lens`` over the prefill sub-batch (exact unless
            a row there is marked inexact, then an upper bound), 0 without prefills.
        slot_mapping_exact: True when every real token's cache slot is known on the host.
    """

    query_start_loc: np.ndarray = array_field(place="both")
    seq_lens: np.ndarray = array_field(place="both", host_name="seq_lens_cpu_upper_bound")
    block_table: np.ndarray = array_field(place="device")
    slot_mapping: np.ndarray = array_field(place="device")
    tree_attn_bias: np.ndarray = array_field(place="device")
    prefill_query_start_loc: np.ndarray = array_field(place="both")
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    tree_size: int
    draft_index: int | None
    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    num_prefill_tokens: int
    max_decode_query_len: int
    max_decode_seq_len: int
    max_prefill_query_len: int
    max_prefill_seq_len: int
    slot_mapping_exact: bool


# ---------------------------------------------------------------------------------------------
# The tree: parsing, validation, bias (once per tree, cached)
# ---------------------------------------------------------------------------------------------

_FIX_FORMAT = (
    'Fix: write the tree as a list of paths from the root, each a tuple of child indices, for '
    'example "[(0,), (1,), (0, 0), (0, 1)]" (note the trailing comma in one-element tuples).'
)


def parse_speculative_token_tree(tree: Any = None) -> tuple[Path, ...]:
    """Parse and validate a speculative token tree; return its paths in canonical order.

    Args:
        tree: a string such as ``"[(0,), (1,), (0, 0)]"`` (parsed with `ast.literal_eval`), a
            sequence of paths (tuples or lists of ints >= 0), or None for ``[(0,)]``.

    Returns:
        The paths as tuples of Python ints, sorted by (depth, path); node ``k`` of the bias is
        path ``k - 1`` of the result (node 0 is the root).

    Raises:
        SpecError: the string is not a Python literal, the tree is empty, a path is empty,
            duplicated or has no parent in the tree. TypeError: a path or child index has the
            wrong type (bool and float are not child indices).

    Example:
        >>> parse_speculative_token_tree("[(0, 1), (1,), (0,), (0, 0)]")
        ((0,), (1,), (0, 0), (0, 1))
    """
    if tree is None:
        return DEFAULT_TREE
    if isinstance(tree, str):
        return _parse_cached(tree)
    if isinstance(tree, tuple):
        try:
            hash(tree)
        except TypeError:  # a tuple holding lists: validate it every time
            return _canonical(tree)
        return _canonical_cached(tree)  # a per-step caller passing the same tuple pays once
    return _canonical(tree)


@functools.lru_cache(maxsize=64)
def _canonical_cached(tree: tuple[Any, ...]) -> tuple[Path, ...]:
    return _canonical(tree)


@functools.lru_cache(maxsize=64)
def _parse_cached(text: str) -> tuple[Path, ...]:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise SpecError(
            f"speculative_token_tree: {shown!r} is not a Python literal list of paths "
            f"({type(exc).__name__}). {_FIX_FORMAT}"
        ) from None
    return _canonical(value)


def _canonical(value: Any) -> tuple[Path, ...]:
    """Validate a parsed tree and return its paths sorted by (depth, path)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | set | frozenset):
        raise TypeError(
            f"speculative_token_tree: expected a list of paths or its string form, received "
            f"{type(value).__name__} {value!r}. {_FIX_FORMAT}"
        )
    items = list(value)
    if not items:
        raise SpecError(
            "speculative_token_tree: the tree has no path, so nothing is drafted. Fix: give at "
            "least one path such as [(0,)], or use a backend without speculation ('triton')."
        )
    paths: list[Path] = []
    seen: set[Path] = set()
    for index, item in enumerate(items):
        if isinstance(item, numbers.Integral) and not isinstance(item, bool):
            raise TypeError(
                f"speculative_token_tree: entry {index} is the int {item!r}, not a path. A "
                f"one-node path needs a trailing comma: write ({item},), not ({item})."
            )
        if not isinstance(item, tuple | list):
            raise TypeError(
                f"speculative_token_tree: entry {index} is {item!r} ({type(item).__name__}); "
                f"expected a path, a tuple of child indices. {_FIX_FORMAT}"
            )
        for child in item:
            if isinstance(child, bool) or not isinstance(child, numbers.Integral):
                raise TypeError(
                    f"speculative_token_tree: path {tuple(item)!r} has the child index {child!r} "
                    f"({type(child).__name__}); child indices are ints >= 0. Fix: use plain ints."
                )
            if child < 0:
                raise SpecError(
                    f"speculative_token_tree: path {tuple(item)!r} has the negative child index "
                    f"{int(child)}; child i is the i-th candidate after its parent, i >= 0. Fix: "
                    f"renumber the children from 0."
                )
        path = tuple(int(child) for child in item)
        if not path:
            raise SpecError(
                f"speculative_token_tree: entry {index} is the empty path (); the root is implicit "
                f"(node 0 of the bias). Fix: remove it."
            )
        if path in seen:
            raise SpecError(
                f"speculative_token_tree: path {path!r} appears twice. Fix: list each node once."
            )
        seen.add(path)
        paths.append(path)
    for path in paths:
        parent = path[:-1]
        if parent and parent not in seen:
            raise SpecError(
                f"speculative_token_tree: path {path!r} has no parent: {parent!r} is not in the "
                f"tree. Every prefix of a path is a node too. Fix: add {parent!r} (and its own "
                f"missing prefixes), or remove {path!r}."
            )
    return tuple(sorted(paths, key=lambda p: (len(p), p)))


def tree_attention_bias(tree: Any = None) -> np.ndarray:
    """The additive tree bias: float32 [L, L], read-only, cached per tree.

    ``bias[i, j] == 0`` when node ``i`` may attend to node ``j``: ``j == i``, ``j == 0`` (the
    root) or ``j`` an ancestor of ``i``; ``-inf`` otherwise. Node 0 is the root, node ``k`` is
    path ``k - 1`` of `parse_speculative_token_tree`'s canonical order.

    Args:
        tree: anything `parse_speculative_token_tree` accepts.

    Example:
        >>> tree_attention_bias("[(0,), (1,), (0, 0)]")[3].tolist()
        [0.0, 0.0, -inf, 0.0]
    """
    return _bias(parse_speculative_token_tree(tree))


@functools.lru_cache(maxsize=64)
def _bias(paths: tuple[Path, ...]) -> np.ndarray:
    size = len(paths) + 1
    node_of = {path: k + 1 for k, path in enumerate(paths)}
    bias = np.full((size, size), -np.inf, dtype=np.float32)
    bias[:, 0] = 0.0
    bias[np.arange(size), np.arange(size)] = 0.0
    for path, node in node_of.items():
        for depth in range(1, len(path)):
            bias[node, node_of[path[:depth]]] = 0.0
    return freeze(bias)


@functools.lru_cache(maxsize=256)
def _drafting_bias(paths: tuple[Path, ...], size: int) -> np.ndarray:
    """The root-excluded sub-square ``bias[1 : 1 + size, 1 : 1 + size]``, contiguous and frozen."""
    full = _bias(paths)
    return freeze(np.ascontiguousarray(full[1 : 1 + size, 1 : 1 + size]))


_EMPTY_BIAS = freeze(np.zeros((0, 0), dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# The builder (per step)
# ---------------------------------------------------------------------------------------------


def _max(values: np.ndarray) -> int:
    return int(values.max()) if values.size else 0


def build(
    batch: Batch,
    /,
    *,
    speculative_token_tree: Any = None,
    draft_index: int | None = None,
) -> TreeMetadata:
    """Build tree-attention metadata on the host (numpy only; the "plan" phase).

    Args:
        batch: the step, in decode-first order for ``decode_threshold = L`` (use
            ``perm, batch = attnsync.reorder(batch, decode_threshold=L)`` first).
        speculative_token_tree: the tree (see the module docstring); default ``[(0,)]``.
        draft_index: None for verification; ``0`` or ``d >= 1`` for a drafting step.

    Returns:
        `TreeMetadata`. Raises `SpecError` for a bad tree, a bad `draft_index` or a batch that
        is not decode-first.
    """
    paths = parse_speculative_token_tree(speculative_token_tree)
    size = len(paths) + 1
    if draft_index is not None:
        draft_index = as_int(draft_index, "draft_index", minimum=0)
    common = build_common(batch, decode_threshold=size)
    if not common.is_decode_first:
        # Raises, naming the first misplaced row and the reorder call that fixes it.
        require_decode_first(batch, decode_threshold=size, backend="tree", strict=False)

    nd, ndt = common.num_decodes, common.num_decode_tokens
    n = common.num_scheduled_reqs
    qsl = common.query_start_loc
    query_lens = common.query_lens
    seq_lens = common.seq_lens  # host values: exact, or an upper bound for inexact rows
    prefill_qsl = qsl[nd:] - qsl[nd]
    freeze(prefill_qsl)

    if draft_index is None:
        bias = _bias(paths)
    elif draft_index == 0:
        bias = _EMPTY_BIAS
    else:
        bias = _drafting_bias(paths, min(common.max_query_len, size - 1))

    return inherit(
        common,
        TreeMetadata,
        query_start_loc=qsl,
        seq_lens=seq_lens,
        tree_attn_bias=bias,
        prefill_query_start_loc=prefill_qsl,
        tree_size=size,
        draft_index=draft_index,
        num_decodes=nd,
        num_decode_tokens=ndt,
        num_prefills=n - nd,
        num_prefill_tokens=common.num_scheduled_tokens - ndt,
        max_decode_query_len=_max(query_lens[:nd]),
        max_decode_seq_len=_max(seq_lens[:nd]),
        max_prefill_query_len=_max(query_lens[nd:n]),
        max_prefill_seq_len=_max(seq_lens[nd:n]),
    )
