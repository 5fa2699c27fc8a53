"""Bad-input fuzzing: `Batch` keywords, every backend's `build` options, and every `lower`.

Each malformed input must end in `attnsync.SpecError` or `TypeError` whose message names the
field (the keyword, the option, the metadata field, ``seq_lens`` or ``device``): never another
exception, never a silent result. tests/test_validation.py already fuzzes `Batch` with
mutations of valid arrays; here `Batch` gets junk of any type in any keyword, and the rest of
the module covers what comes after it:

- `build`: every backend (those present), each option replaced by a value it documents as
  invalid, required options left out, unknown options, bad backend names;
- `lower` (torch and JAX; Flex's own torch lowering too): metadata objects edited with
  `dataclasses.replace` (arrays as lists, tensors, None, strings, floats, wider integers with
  values beyond int32, wrong lengths; int and bool scalars of the wrong type or negative),
  things that are not metadata at all, bad device ``seq_lens`` and bad devices.

What the adapters do *not* re-check, by design, is the values of a built metadata object:
`Batch` validated them once, and an int32 array edited to hold other int32 values (or an int32
array where a bool one was) lowers as given. Integer arrays of another width whose values fit
int32 are narrowed to int32, as the JAX adapter always did.

At least 10,000 malformed inputs are tried per run (the module's last test asserts it), with
fixed seeds: Hypothesis is derandomized, so every run of the same command on the same code (CI
included) tries the same inputs. (Hypothesis also draws constants from the project modules that
are loaded, so this module alone tries slightly other inputs than the whole suite.) Set
ATTNSYNC_FUZZ_SEED=<int> to explore with another seed. Inputs are kept small (a four-row batch)
so the module stays a few seconds of CI time.

The number of inputs tried per category is written by the module's last test to the file named
by the environment variable ATTNSYNC_FUZZ_STATS, else to `fuzz_stats.txt` in pytest's base temp
directory (e.g. /tmp/pytest-of-$USER/pytest-N/), never into pytest's output.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import attnsync
from attnsync import SpecError
from attnsync._spec import array_fields, scalar_fields

COUNTS: collections.Counter = collections.Counter()
SECONDS: collections.Counter = collections.Counter()
SEED = os.environ.get("ATTNSYNC_FUZZ_SEED")  # unset: derandomized (the same inputs every run)


def fuzz(max_examples: int):
    """Hypothesis settings of this module: `max_examples` inputs, no deadline, no example
    database, fixed seeds (derandomized, or ATTNSYNC_FUZZ_SEED); the test's time is recorded."""
    config = settings(max_examples=max_examples, deadline=None, database=None, derandomize=SEED is None,
                      suppress_health_check=list(HealthCheck))

    def apply(test):
        test = config(test)
        if SEED is not None:
            test = seed(int(SEED))(test)

        @functools.wraps(test)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return test(*args, **kwargs)
            finally:
                SECONDS[test.__name__] += time.perf_counter() - start

        return timed

    return apply


def refused(category: str, fn, names: tuple[str, ...]):
    """Run `fn`; it must raise SpecError or TypeError whose message contains one of `names`."""
    COUNTS[category] += 1
    try:
        result = fn()
    except (SpecError, TypeError) as exc:
        message = str(exc)
        assert any(name in message for name in names), f"{category}: message does not name {names}: {message}"
        COUNTS[f"{category}: {type(exc).__name__}"] += 1
        return exc
    except Exception as exc:  # any other exception is what this test exists to catch
        pytest.fail(f"{category}: {type(exc).__name__} instead of SpecError/TypeError (naming {names}): {exc}")
    pytest.fail(f"{category}: silent result {type(result).__name__}; expected a refusal naming {names}")


def present(name: str) -> bool:
    try:
        __import__(f"attnsync.backends.{name}")
    except ModuleNotFoundError:
        return False
    return True


BACKENDS = [name for name in attnsync.available_backends() if present(name)]

# A valid mixed batch in decode-first order for every backend: 2 decodes (the second may be a
# tree of up to 4 nodes), a long extend, a fresh prefill.
BATCH = dict(query_lens=[1, 1, 6, 5], seq_lens=[17, 40, 20, 5], block_table=np.arange(1, 17).reshape(4, 4),
             block_size=16)
VALID_OPTIONS = {
    "common": {},
    "flashinfer": {},
    "flex": {"num_cache_pages": 20},
    "mamba": {"chunk_size": 8},
    "tree": {"speculative_token_tree": "[(0,), (1,), (0, 0)]"},
    "triton": {"num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16},
    "turboquant": {},
}
INT_JUNK = [True, 1.5, "4", None, [4], math.nan]
# option -> values the backend documents as invalid (in addition to INT_JUNK where marked)
INVALID = {
    "common": {"decode_threshold": [0, -1, *INT_JUNK]},
    "flashinfer": {"decode_threshold": [0, -3, *INT_JUNK]},
    "flex": {
        "num_cache_pages": [0, -1, 16, *INT_JUNK],  # 16: page id 16 is in the table
        "q_block_size": [0, 3, 12, -16, *INT_JUNK],
        "max_kv_blocks": [0, 1, -1, True, 1.5, "4", [4]],  # None is the default (fit the step)
        "inverse_table": ["gpu", 1, True, None],
        "decode_threshold": [0, *INT_JUNK],
    },
    "mamba": {
        "variant": ["mamba3", 2, None],
        "chunk_size": [0, -8, *INT_JUNK[:3], math.nan],
        "cache_mode": ["bogus", 0, None],
        "num_spec_tokens": [-1, True, 1.5, "1"],
        "num_accepted_tokens": ["x", [0, 0, 0, 0], [3, 3, 3, 3], [[1]], [1.5, 1, 1, 1]],
        "decode_threshold": [0, -1, True, 1.5],
        "conv_capacity": [0, -1, True, 1.5],
    },
    "tree": {
        "speculative_token_tree": ["not a tree", "[(0,), (0,)]", "[()]", "[(0, 0)]", "[(-1,)]", 3.5,
                                   "[(0,), (1,", [(0.5,)], [], "__import__('os')"],
        "draft_index": [-1, True, "1", 1.5],
    },
    "triton": {
        "num_q_heads": [0, -4, 3, *INT_JUNK],
        "num_kv_heads": [0, 3, *INT_JUNK],
        "head_dim": [0, -1, *INT_JUNK],
        "seq_threshold_3d": [0, True, "8"],
        "num_segments": [0, True, "16"],
        "split_kv_min_seq_len": [-1, True, 1.5],
        "prefix_ranges": ["x", 5, [None], [[(3, 1)], None, None, None], [[(0, 10**6)], None, None, None],
                          {99: [(0, 1)]}, [[(0,)], None, None, None], [[("a", 1)], None, None, None]],
        "decode_threshold": [0, True],
    },
    "turboquant": {"decode_threshold": [2, 0, True], "inexact_spec_rows": ["bogus", None, 1]},
}
REQUIRED = {"triton": ("num_q_heads", "num_kv_heads", "head_dim"), "flex": ("num_cache_pages",), "mamba": ("chunk_size",)}


def _batch():
    return attnsync.Batch(**BATCH)


def test_valid_options_build():
    batch = _batch()
    for name in BACKENDS:
        attnsync.build(batch, backend=name, **VALID_OPTIONS[name])


# --------------------------------------------------------------------------------------------
# Batch: junk of any type in any keyword

BATCH_KEYWORDS = ("query_lens", "seq_lens", "block_table", "block_size", "seq_lens_exact", "is_prefilling",
                  "padded_num_reqs", "padded_num_tokens", "num_cache_pages")
OPTIONAL_NONE = {"is_prefilling", "padded_num_reqs", "padded_num_tokens", "num_cache_pages"}
BOOL_KEYWORDS = {"seq_lens_exact", "is_prefilling"}


def junk():
    return st.one_of(
        st.sampled_from([object(), {}, {"a": 1}, "x", "", 1j, b"16", math.nan, math.inf, slice(1),
                         np.zeros((2, 2, 2), np.int32), np.array(["a", "b"]), np.array([1.5, 2.5]),
                         [["a"]], [None, None], lambda: 1]),
        st.floats(allow_nan=True).filter(lambda f: not float(f).is_integer()),
        st.integers(2**63, 2**80).map(lambda v: v * (1 if v % 2 else -1)),
        st.none(),
        st.booleans(),
    )


@fuzz(1500)
@given(keyword=st.sampled_from(BATCH_KEYWORDS), value=junk())
def test_fuzz_batch_junk_keywords(keyword, value):
    if value is None and keyword in OPTIONAL_NONE:
        return  # None means "not given" there
    if isinstance(value, bool) and keyword in BOOL_KEYWORDS:
        return  # one bool for every row is valid
    if keyword == "num_cache_pages" and type(value) is int and value > 0:
        return  # any positive page count is a valid (if large) cache
    refused("Batch keyword", lambda: attnsync.Batch(**{**BATCH, keyword: value}), (keyword,))


@st.composite
def bad_batch_values(draw):
    """A well-typed `Batch` keyword with a value it must refuse, and the names the refusal may
    give (a too-small block size or cache is reported by the table that no longer fits)."""
    keyword = draw(st.sampled_from(BATCH_KEYWORDS))
    rows = 4
    big = draw(st.integers(2**31, 2**40))
    small = st.integers(0, 40)
    if keyword in ("query_lens", "seq_lens"):
        good = list(BATCH[keyword])
        kind = draw(st.sampled_from(["length", "negative", "int32", "query_above_seq"]))
        if kind == "length":
            value = draw(st.lists(small, min_size=0, max_size=8).filter(lambda v: len(v) != rows))
        elif kind == "negative":
            value = good.copy()
            value[draw(st.integers(0, rows - 1))] = draw(st.integers(-(2**40), -1))
        elif kind == "int32":
            value = good.copy()
            value[draw(st.integers(0, rows - 1))] = big
        else:  # a query longer than its sequence, from either side
            row = draw(st.integers(0, rows - 1))
            value = good.copy()
            if keyword == "query_lens":
                value[row] = BATCH["seq_lens"][row] + draw(st.integers(1, 50))
            else:
                value[row] = BATCH["query_lens"][row] - 1 if BATCH["query_lens"][row] > 0 else -1
        return keyword, value, (keyword, "seq_lens", "query_lens")
    if keyword == "block_table":
        table = np.array(BATCH["block_table"])
        kind = draw(st.sampled_from(["negative", "int32", "narrow", "rows", "3d"]))
        if kind == "negative":
            table[draw(st.integers(0, rows - 1)), draw(st.integers(0, 3))] = draw(st.integers(-(2**31), -1))
            value = table
        elif kind == "int32":
            value = table.astype(np.int64)
            value[draw(st.integers(0, rows - 1)), draw(st.integers(0, 3))] = big
        elif kind == "narrow":  # row 1 (seq_len 40) needs 3 pages of 16
            value = table[:, : draw(st.integers(0, 2))]
        elif kind == "rows":
            value = np.resize(table, (draw(st.sampled_from([0, 1, 2, 3, 5, 7])), 4))
        else:
            value = table.reshape(rows, 2, 2)
        return keyword, value, ("block_table",)
    if keyword == "block_size":  # <= 0, beyond int32, or too small for the table's width
        value = draw(st.one_of(st.integers(-(2**40), 0), st.just(big), st.integers(1, 9)))
        return keyword, value, ("block_size", "block_table")
    if keyword in ("padded_num_reqs", "padded_num_tokens"):
        floor = rows if keyword == "padded_num_reqs" else sum(BATCH["query_lens"])
        value = draw(st.one_of(st.integers(-(2**40), floor - 1), st.just(big)))
        return keyword, value, (keyword,)
    if keyword == "num_cache_pages":  # page ids run to 16 (any larger count is a valid cache)
        value = draw(st.integers(-(2**40), 16))
        return keyword, value, ("num_cache_pages", "block_table")
    # the per-row bools: one value per request
    value = draw(st.lists(st.booleans(), min_size=0, max_size=8).filter(lambda v: len(v) != rows))
    return keyword, value, (keyword,)


@fuzz(1200)
@given(case=bad_batch_values())
def test_fuzz_batch_bad_values(case):
    keyword, value, names = case
    refused("Batch value", lambda: attnsync.Batch(**{**BATCH, keyword: value}), names)


# --------------------------------------------------------------------------------------------
# build: invalid, missing and unknown options; bad backend names

CASES = [(name, option, value) for name in BACKENDS for option, values in INVALID[name].items() for value in values]


@fuzz(2500)
@given(case=st.sampled_from(CASES), extra_rows=st.integers(0, 3), pad=st.integers(0, 5))
def test_fuzz_build_invalid_options(case, extra_rows, pad):
    name, option, value = case
    batch = attnsync.Batch(**BATCH, padded_num_reqs=4 + extra_rows, padded_num_tokens=13 + pad)
    options = {**VALID_OPTIONS[name], option: value}
    refused(f"build {name}", lambda: attnsync.build(batch, backend=name, **options), (option,))


@pytest.mark.parametrize(("name", "option"), [(n, o) for n, opts in REQUIRED.items() for o in opts if n in BACKENDS])
def test_build_missing_required_options(name, option):
    options = {k: v for k, v in VALID_OPTIONS[name].items() if k != option}
    refused(f"build {name} missing", lambda: attnsync.build(_batch(), backend=name, **options), (option,))


@fuzz(600)
@given(name=st.sampled_from(BACKENDS), option=st.from_regex(r"[a-z][a-z_]{0,14}", fullmatch=True))
def test_fuzz_build_unknown_options(name, option):
    if option in VALID_OPTIONS[name] or option in INVALID[name]:
        return
    refused("build unknown option", lambda: attnsync.build(_batch(), backend=name, **VALID_OPTIONS[name],
                                                           **{option: 1}), (option,))


@fuzz(400)
@given(backend=st.one_of(st.text(max_size=8), st.integers(), st.none(), st.just(["common"])),
       batch=st.sampled_from(["batch", None, {"query_lens": [1]}, 3]))
def test_fuzz_build_bad_backend_or_batch(backend, batch):
    if isinstance(backend, str) and backend in attnsync.available_backends():
        return
    if batch == "batch":
        refused("build backend name", lambda: attnsync.build(_batch(), backend=backend), ("backend",))
    else:
        refused("build non-batch", lambda: attnsync.build(batch, backend="common"), ("build", "Batch"))


# --------------------------------------------------------------------------------------------
# lower: edited metadata, non-metadata, bad seq_lens, bad devices


def _metadata(name: str, *, exact: bool = True):
    extra = {} if exact else {"seq_lens_exact": [False, True, True, True]}
    return attnsync.build(attnsync.Batch(**BATCH, **extra), backend=name, **VALID_OPTIONS[name])


MD = {name: _metadata(name) for name in BACKENDS}
LENGTH_RULES = {"query_start_loc", "seq_lens", "slot_mapping", "block_table"}
ARRAY_MUTATIONS = ("list", "float64", "overflow64", "overflowu64", "str", "none", "tensor", "zero_d", "object",
                   "length", "complex")


def _scalar_kinds(md):
    kinds = {}
    for f in scalar_fields(md):
        if f.type in ("int", "bool"):
            kinds[f.name] = f.type
    return kinds


@st.composite
def edited_metadata(draw):
    name = draw(st.sampled_from(BACKENDS))
    md = MD[name]
    arrays = [f.name for f in array_fields(md)]
    scalars = _scalar_kinds(md)
    if scalars and draw(st.integers(0, 3)) == 0:
        field = draw(st.sampled_from(sorted(scalars)))
        if scalars[field] == "int":
            value = draw(st.one_of(st.floats(allow_nan=True), st.text(max_size=3), st.none(), st.booleans(),
                                   st.integers(-(2**40), -1), st.just([1])))
        else:
            value = draw(st.one_of(st.integers(), st.none(), st.text(max_size=2), st.floats()))
        return name, field, dataclasses.replace(md, **{field: value})
    field = draw(st.sampled_from(arrays))
    value = np.asarray(getattr(md, field))
    kind = draw(st.sampled_from(ARRAY_MUTATIONS))
    if kind == "length" and field not in LENGTH_RULES:
        kind = "float64"
    big = draw(st.integers(2**31, 2**62))
    if kind == "list":
        new = value.tolist()
    elif kind == "float64":
        new = value.astype(np.float64)
    elif kind == "overflow64":
        new = np.full(value.shape if value.size else (1,), big, np.int64)
    elif kind == "overflowu64":
        new = np.full(max(value.size, 1), big, np.uint64)
    elif kind == "str":
        new = value.astype(str)
    elif kind == "none":
        new = None
    elif kind == "tensor":
        torch = pytest.importorskip("torch")
        new = torch.from_numpy(np.array(value))
    elif kind == "zero_d":
        new = np.asarray(draw(st.floats(allow_nan=False)), dtype=np.float64)
    elif kind == "object":
        new = value.astype(object)
    elif kind == "complex":
        new = value.astype(np.complex64)
    else:  # length: one row more or less than the metadata's counts say
        delta = draw(st.sampled_from([-1, 1, 2]))
        if value.shape[0] + delta < 0:
            delta = 1
        new = np.resize(value, (value.shape[0] + delta, *value.shape[1:])).astype(value.dtype)
    if kind in ("overflow64", "overflowu64") and field in LENGTH_RULES:
        new = np.full(value.shape if value.size else (0,), big, np.int64)
        if not value.size:  # an empty field cannot hold an out-of-range value: make it a float
            new = value.astype(np.float64)
    return name, field, dataclasses.replace(md, **{field: new})


@fuzz(2000)
@given(case=edited_metadata())
def test_fuzz_torch_lower_edited_metadata(case):
    pytest.importorskip("torch")
    from attnsync.adapters import torch as ast

    name, field, md = case
    refused(f"lower torch {name}", lambda: ast.lower(md, "cpu"), (field,))
    if name == "flex":
        from attnsync.integrations import flex_torch

        refused("lower flex_torch", lambda: flex_torch.lower(md, "cpu"), (field,))


@fuzz(1500)
@given(case=edited_metadata())
def test_fuzz_jax_lower_edited_metadata(case):
    pytest.importorskip("jax")
    from attnsync.adapters import jax as asj

    name, field, md = case
    refused(f"lower jax {name}", lambda: asj.lower(md), (field,))


def _not_metadata():
    items = [None, 3, "md", {"query_start_loc": [0]}, [1, 2], np.zeros(3), attnsync.Batch(**BATCH),
             attnsync.CommonMetadata, object()]
    return st.one_of(st.sampled_from(items), st.sampled_from(BACKENDS).map(lambda n: type(MD[n])))


@fuzz(150)
@given(value=_not_metadata(), framework=st.sampled_from(["torch", "jax"]))
def test_fuzz_lower_non_metadata(value, framework):
    if framework == "torch":
        pytest.importorskip("torch")
        from attnsync.adapters import torch as adapter
    else:
        pytest.importorskip("jax")
        from attnsync.adapters import jax as adapter
    refused(f"lower {framework} non-metadata", lambda: adapter.lower(value), ("lower",))


def test_lowering_a_lowered_object_is_refused():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    from attnsync.adapters import jax as asj
    from attnsync.adapters import torch as ast

    for name in BACKENDS:
        lowered = ast.lower(MD[name], "cpu")
        refused("lower a lowered object", lambda lowered=lowered: ast.lower(lowered, "cpu"), ("lower",))
        refused("lower a lowered object", lambda lowered=lowered: asj.lower(lowered), ("lower",))
        if name != "flex" and "flex" in BACKENDS:
            from attnsync.integrations import flex_torch

            refused("flex_torch.lower other md", lambda md=MD[name]: flex_torch.lower(md, "cpu"), ("lower", "Flex"))


@st.composite
def bad_seq_lens(draw):
    torch = pytest.importorskip("torch")
    name = draw(st.sampled_from(BACKENDS))
    rows = MD[name].num_reqs
    good = np.array([16, 40, 20, 5], np.int32)[:rows]
    kind = draw(st.sampled_from(["list", "numpy", "int64", "float32", "bool", "short", "long", "2d", "0d", "jax"]))
    if kind == "list":
        value = good.tolist()
    elif kind == "numpy":
        value = good
    elif kind == "int64":
        value = torch.from_numpy(good.astype(np.int64))
    elif kind == "float32":
        value = torch.from_numpy(good.astype(np.float32))
    elif kind == "bool":
        value = torch.from_numpy(good > 0)
    elif kind == "short":
        value = torch.from_numpy(good[: rows - draw(st.integers(1, rows))])
    elif kind == "long":
        value = torch.from_numpy(np.concatenate([good, good[: draw(st.integers(1, rows))]]))
    elif kind == "2d":
        value = torch.from_numpy(good[None, :])
    elif kind == "0d":
        value = torch.tensor(draw(st.integers(0, 100)), dtype=torch.int32)
    else:
        jax = pytest.importorskip("jax")
        value = jax.numpy.asarray(good)
    return name, draw(st.booleans()), value


@fuzz(700)
@given(case=bad_seq_lens())
def test_fuzz_torch_lower_bad_device_seq_lens(case):
    from attnsync.adapters import torch as ast

    name, exact, value = case
    md = MD[name] if exact or name in ("flashinfer", "mamba") else _inexact(name)
    refused("lower torch seq_lens", lambda: ast.lower(md, "cpu", seq_lens=value), ("seq_lens",))


_INEXACT: dict = {}


def _inexact(name):
    if name not in _INEXACT:
        _INEXACT[name] = _metadata(name, exact=False)
    return _INEXACT[name]


@fuzz(300)
@given(name=st.sampled_from(BACKENDS),
       device=st.one_of(st.sampled_from(["nope", "cuda:x", "", "gpu", 1.5, None, [], "cuda:99"]),
                        st.text(min_size=1, max_size=5).filter(lambda t: t.strip() not in ("cpu", "cuda", "meta"))))
def test_fuzz_torch_lower_bad_device(name, device):
    torch = pytest.importorskip("torch")
    from attnsync.adapters import torch as ast

    if device == "cuda:99" and torch.cuda.device_count() > 99:  # pragma: no cover
        return
    try:
        valid = (isinstance(device, str) and torch.device(device).type in ("cpu", "meta")) or (
            isinstance(device, str) and torch.device(device).type == "cuda" and torch.cuda.is_available()
            and (torch.device(device).index or 0) < torch.cuda.device_count())
    except Exception:
        valid = False
    if valid:
        return
    refused("lower torch device", lambda: ast.lower(MD[name], device), ("device",))


@fuzz(60)
@given(name=st.sampled_from(BACKENDS), device=st.sampled_from(["cpu", 0, None, "gpu", 1.5]))
def test_fuzz_jax_lower_bad_device(name, device):
    pytest.importorskip("jax")
    from attnsync.adapters import jax as asj

    if device is None:
        return  # None: the default device
    refused("lower jax device", lambda: asj.lower(MD[name], device), ("device",))


def test_inexact_metadata_without_device_lengths_is_refused():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    from attnsync.adapters import jax as asj
    from attnsync.adapters import torch as ast

    for name in BACKENDS:
        if name in ("flashinfer", "mamba"):
            continue  # they refuse this batch at build, or have no slot mapping to recompute
        md = _inexact(name)
        refused("lower torch inexact", lambda md=md: ast.lower(md, "cpu"), ("seq_lens",))
        refused("lower jax inexact", lambda md=md: asj.lower(md), ("slot_mapping", "inexact"))


def test_in_range_wider_integers_are_narrowed_not_refused():
    torch = pytest.importorskip("torch")
    pytest.importorskip("jax")
    from attnsync.adapters import jax as asj
    from attnsync.adapters import torch as ast

    md = MD["common"]
    wide = dataclasses.replace(md, seq_lens=md.seq_lens.astype(np.int64), block_table=md.block_table.astype(np.uint16))
    t = ast.lower(wide, "cpu")
    assert t.seq_lens.dtype == torch.int32 and t.seq_lens.tolist() == md.seq_lens.tolist()
    assert t.seq_lens_cpu_upper_bound.dtype == torch.int32 and t.block_table_tensor.dtype == torch.int32
    j = asj.lower(wide)
    assert j.block_table.dtype == np.int32 and np.asarray(j.block_table).tolist() == md.block_table.tolist()


def test_counts_reach_thousands(tmp_path_factory):
    """Runs last in this module (file order): how many inputs the fuzz above tried, written to
    a file (a print would break `pytest -q`'s progress line)."""
    tried = sum(v for k, v in COUNTS.items() if ":" not in k)
    lines = [f"fuzz (tests/test_fuzz_lower.py): {tried} malformed inputs tried, each refused with "
             f"SpecError/TypeError naming the field",
             f"seed: {SEED if SEED is not None else 'derandomized (fixed)'}; "
             f"{sum(SECONDS.values()):.1f} s in the fuzz tests"]
    lines += [f"  {key}: {COUNTS[key]}" for key in sorted(COUNTS)]
    lines += [f"  time {name}: {SECONDS[name]:.2f} s" for name in sorted(SECONDS)]
    path = Path(os.environ.get("ATTNSYNC_FUZZ_STATS") or tmp_path_factory.getbasetemp() / "fuzz_stats.txt")
    path.write_text("\n".join(lines) + "\n")
    assert path.read_text().startswith("fuzz (tests/test_fuzz_lower.py): ")
    if tried < 100:
        pytest.skip("run the whole module to count")
    assert tried >= 10_000, COUNTS
