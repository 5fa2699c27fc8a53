"""attnsync against vLLM 0.33's own code, on the CPU: run by scripts/vllm-check.sh (pytest -m vllm).

The same steps (vllm_steps.py: attnsync's corpus and batches shaped like vLLM's backend test
specs) go through vLLM's runner-side construction and through attnsync, and every field both
produce is compared: the `CommonAttentionMetadata` (values, dtypes, shapes, devices), the
decode/prefill splits vLLM's builders compute, vLLM's reorder, and vLLM's Triton metadata
builder against attnsync's. Without vLLM every module here skips at import.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("vllm.v1.attention.backend", reason="vLLM is not installed (scripts/vllm-check.sh installs 0.33.0)")

import torch  # noqa: E402
import vllm_steps as vs  # noqa: E402
from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends import utils as vu  # noqa: E402

import attnsync  # noqa: E402
from attnsync.integrations import vllm as av  # noqa: E402

pytestmark = pytest.mark.vllm

STEPS = vs.all_steps()
# Passed through from vLLM's metadata, not built by attnsync: compared only for presence.
PASSED_THROUGH = {"positions"}


def assert_no_mismatches(ledger, before: int) -> None:
    new = ledger.mismatches[before:]
    assert not new, "\n".join(new[:20])


def test_the_ledger_flags_what_differs(ledger):
    fresh = type(ledger)()  # not the session's: these mismatches are on purpose
    t = torch.arange(4, dtype=torch.int32)
    assert fresh.compare("t", "b", "same", t, t.clone())
    assert not fresh.compare("t", "b", "value", t, t + (t == 3).to(torch.int32))
    assert not fresh.compare("t", "b", "dtype", t, t.to(torch.int64))
    assert not fresh.compare("t", "b", "shape", t, t[:3])
    assert not fresh.compare("t", "b", "an int against a bool", 1, True)
    assert not fresh.compare("t", "b", "tuples", (1, 2), (1, 3))
    assert len(fresh.mismatches) == 5 and fresh.fields["t"] == 6 and "at (3,)" in fresh.mismatches[0]


def test_the_steps_cover_what_the_check_claims():
    names = [step.name for step in STEPS]
    assert len(names) == len(set(names))
    assert sum(name.startswith("corpus: ") for name in names) >= 30
    assert sum(name.startswith("vllm-shaped: ") for name in names) >= 18
    assert any(step.async_spec for step in STEPS) and any(step.num_reqs_padded > step.n for step in STEPS)


def test_common_attention_metadata_matches_vllm(ledger):
    """attnsync's `CommonAttentionMetadata` (to_vllm_common) equals the one vLLM's V1 runner
    builds, field by field; slot ids against vLLM's own slot-mapping kernel."""
    before = len(ledger.mismatches)
    for step in STEPS:
        cam, table = vs.vllm_side(step)
        _, _, ours = vs.attnsync_side(step, cam, table)
        assert isinstance(ours, CommonAttentionMetadata)
        for field in dataclasses.fields(CommonAttentionMetadata):
            if field.name == "seq_lens" and step.async_spec:
                # Inexact host lengths: attnsync lowers with vLLM's exact device seq_lens.
                assert ours.seq_lens is cam.seq_lens
                ledger.documented("seq_lens under async spec decode: vLLM's exact device tensor, passed through")
                continue
            if field.name in PASSED_THROUGH:
                assert getattr(ours, field.name) is getattr(cam, field.name)
                continue
            ledger.compare("CommonAttentionMetadata", step.name, field.name,
                           getattr(ours, field.name), getattr(cam, field.name))
    assert_no_mismatches(ledger, before)


def test_to_vllm_common_fields_have_vllms_types_without_vllm_in_the_loop(ledger):
    """`vllm_common_fields` (the no-vLLM path) holds the same tensors as `to_vllm_common`."""
    before = len(ledger.mismatches)
    step = next(s for s in STEPS if s.name == "vllm-shaped: small mixed")
    cam, table = vs.vllm_side(step)
    batch = av.batch_from_vllm(cam, block_size=step.block_size, block_table_cpu=table.get_numpy_array())
    from attnsync.adapters import torch as ast

    lowered = ast.lower(attnsync.build(batch), "cpu")
    fields = av.vllm_common_fields(lowered)
    ours = av.to_vllm_common(lowered)
    for name, (_, dtype, place) in av.VLLM_COMMON_FIELDS.items():
        assert fields[name] is getattr(ours, name) and fields[name].dtype == dtype, (name, place)
        ledger.compare("CommonAttentionMetadata dtypes (field table)", step.name, name, fields[name].dtype,
                       getattr(cam, name).dtype)
    with pytest.raises(attnsync.SpecError, match="slot_mapping: vLLM expects a torch.int64"):
        from attnsync.adapters.torch import with_fields

        av.vllm_common_fields(with_fields(lowered, slot_mapping=lowered.slot_mapping.to(torch.int32)))
    assert_no_mismatches(ledger, before)


# ---------------------------------------------------------------------------------------------
# The decode/prefill split


def _orders(step: vs.Step, threshold: int) -> list[tuple[str, vs.Step]]:
    """The step in the row orders a builder can meet: attnsync's decode-first order, vLLM V1's
    reorder of a shuffled batch, and model runner V2's sort."""
    batch = av.batch_from_vllm_state(num_scheduled_tokens=step.num_scheduled, num_computed_tokens=step.num_computed,
                                     num_prompt_tokens=step.num_prompt, block_table=_host_rows(step),
                                     block_size=step.block_size)
    perm, _ = attnsync.reorder(batch, decode_threshold=threshold)
    shuffled = step.take(np.random.default_rng(step.n).permutation(step.n))
    return [
        ("attnsync order", step.take(perm)),
        ("vLLM V1 reorder", shuffled.take(vs.vllm_reorder_order(shuffled, threshold))),
        ("vLLM V2 order", shuffled.take(vs.vllm_v2_order(shuffled, threshold))),
    ]


def _host_rows(step: vs.Step) -> np.ndarray:
    table = np.zeros((step.n, vs.block_table_width(step)), dtype=np.int32)
    for row, pages in enumerate(step.pages):
        table[row, : len(pages)] = pages
    return table


def _vllm_or_none(fn, *args, **kwargs):
    """vLLM's result, or None where vLLM itself cannot answer (an empty batch it never builds)."""
    try:
        return tuple(int(v) for v in fn(*args, **kwargs))
    except (IndexError, RuntimeError):
        return None


def _expected_from_attnsync_counts(md, batch, threshold: int, treat_short: bool, extends: bool):
    """vLLM's split, predicted from attnsync's own counts for a batch in attnsync's order:
    vLLM reads the split off positions and counts padding in the last group."""
    regions = batch.regions(threshold)
    q = batch.query_lens
    rows = [int((regions == k).sum()) for k in range(4)]
    tokens = [int(q[regions == k].sum()) for k in range(4)]
    assert (rows[0], rows[1] + rows[2], rows[3]) == (md.num_decodes, md.num_extends, md.num_prefills)
    assert (tokens[0], tokens[1] + tokens[2], tokens[3]) == (
        md.num_decode_tokens, md.num_extend_tokens, md.num_prefill_tokens)
    n, r, t = md.num_scheduled_reqs, md.num_reqs, md.num_actual_tokens
    if extends:
        if md.max_query_len <= threshold:
            return r, 0, 0, t, 0, 0
        d, dt = rows[0] + rows[1], tokens[0] + tokens[1]
        if rows[3] == 0:
            return d, r - d, 0, dt, t - dt, 0
        return d, rows[2], r - d - rows[2], dt, tokens[2], t - dt - tokens[2]
    d, dt = (rows[0] + rows[1], tokens[0] + tokens[1]) if treat_short else (rows[0], tokens[0])
    if d == n:
        return r, 0, t, 0
    return d, r - d, dt, t - dt


@pytest.mark.parametrize("threshold", [1, 4])
def test_decode_prefill_split_matches_vllm(ledger, threshold):
    """vLLM's `split_decodes_and_prefills` (every option) and `split_decodes_prefills_and_extends`
    on attnsync's metadata equal them on vLLM's, and `vllm_split` computes them from host
    values; in attnsync's own order, attnsync's counts predict them."""
    before = len(ledger.mismatches)
    for step in STEPS:
        for order, ordered in _orders(step, threshold):
            cam, table = vs.vllm_side(ordered)
            batch, md, ours = vs.attnsync_side(ordered, cam, table, decode_threshold=threshold)
            name = f"{ordered.name} [{order}, threshold {threshold}]"
            for uniform in (False, True):
                for short in (True, False):
                    options = dict(decode_threshold=threshold, require_uniform=uniform,
                                   treat_short_extends_as_decodes=short)
                    theirs = _vllm_or_none(vu.split_decodes_and_prefills, cam, **options)
                    if theirs is None:
                        continue
                    field = f"split_decodes_and_prefills(require_uniform={uniform}, short_as_decodes={short})"
                    ledger.compare("split (vLLM's function on both)", name, field,
                                   _vllm_or_none(vu.split_decodes_and_prefills, ours, **options), theirs)
                    ledger.compare("split (attnsync's vllm_split)", name, field, av.vllm_split(md, **options), theirs)
                    if order == "attnsync order" and not uniform:
                        ledger.compare("split (attnsync's own counts)", name, field,
                                       _expected_from_attnsync_counts(md, batch, threshold, short, False), theirs)
            theirs = _vllm_or_none(vu.split_decodes_prefills_and_extends, cam, decode_threshold=threshold)
            if theirs is None:
                continue
            field = "split_decodes_prefills_and_extends"
            ledger.compare("split (vLLM's function on both)", name, field,
                           _vllm_or_none(vu.split_decodes_prefills_and_extends, ours, decode_threshold=threshold),
                           theirs)
            ledger.compare("split (attnsync's vllm_split)", name, field,
                           av.vllm_split_with_extends(md, decode_threshold=threshold), theirs)
            if order == "attnsync order":
                ledger.compare("split (attnsync's own counts)", name, field,
                               _expected_from_attnsync_counts(md, batch, threshold, True, True), theirs)
    assert_no_mismatches(ledger, before)


# ---------------------------------------------------------------------------------------------
# The reorder


@pytest.mark.parametrize("threshold", [1, 4])
def test_reorder_matches_vllm(ledger, threshold):
    """`vllm_reorder` gives exactly vLLM's `reorder_batch_to_split_decodes_and_prefills` order;
    `attnsync.reorder` gives the same regions except where docs/vllm.md says it differs."""
    before = len(ledger.mismatches)
    for step in STEPS:
        if step.n < 2:
            continue
        shuffled = step.take(np.random.default_rng([step.n, threshold]).permutation(step.n))
        name = f"{step.name} [shuffled, threshold {threshold}]"
        batch = av.batch_from_vllm_state(num_scheduled_tokens=shuffled.num_scheduled,
                                         num_computed_tokens=shuffled.num_computed,
                                         num_prompt_tokens=shuffled.num_prompt, block_table=_host_rows(shuffled),
                                         block_size=shuffled.block_size)
        theirs = vs.vllm_reorder_order(shuffled, threshold)
        perm, reordered = av.vllm_reorder(batch, decode_threshold=threshold)
        ledger.compare("reorder (vllm_reorder permutation)", name, "permutation", perm, theirs)
        vllm_region = av.vllm_regions(batch, decode_threshold=threshold)
        ledger.compare("reorder (vllm_reorder regions sorted)", name, "regions after reorder",
                       bool((np.diff(vllm_region[perm]) >= 0).all()), True)
        ours = batch.regions(threshold)
        fresh_short = (batch.num_computed_tokens == 0) & (batch.query_lens <= threshold)
        for _ in range(int((ours != vllm_region)[fresh_short].sum())):
            ledger.documented("reorder region: a prompt of <= threshold tokens without context is a prefill "
                              "in vLLM, a short extend (or decode) in attnsync")
        ledger.compare("reorder (attnsync.reorder regions)", name, "region per row",
                       ours[~fresh_short], vllm_region[~fresh_short])
        a_perm, _ = attnsync.reorder(batch, decode_threshold=threshold)
        same_groups = [set(np.flatnonzero(vllm_region[a_perm] == k)) == set(np.flatnonzero(vllm_region[theirs] == k))
                       for k in range(4)]
        if not fresh_short.any():
            ledger.compare("reorder (attnsync.reorder region spans)", name, "rows per region", same_groups,
                           [True] * 4)
            if not np.array_equal(a_perm, theirs):
                ledger.documented("reorder order within a region: attnsync sorts stably, vLLM swaps rows")
    assert_no_mismatches(ledger, before)


def test_model_runner_v2_order_builds_with_short_extends_as_decodes(ledger):
    """vLLM's model runner V2 sorts rows by length: short prompts land among the decodes.
    attnsync's FlashInfer build accepts that order with `short_extends_as_decodes=True`, and
    its decode count is vLLM's split; with is_prefilling kept it refuses it (documented)."""
    before = len(ledger.mismatches)
    checked = 0
    for step in STEPS:
        drafts = [int(q) for q, c, p in zip(step.num_scheduled, step.num_computed, step.num_prompt) if q > 1 and c >= p]
        threshold = max(drafts, default=1)
        ordered = step.take(vs.vllm_v2_order(step, threshold))
        cam, table = vs.vllm_side(ordered)
        host = table.get_numpy_array()
        batch = av.batch_from_vllm(cam, block_size=step.block_size, block_table_cpu=host,
                                   async_spec_decode=step.async_spec, short_extends_as_decodes=True,
                                   decode_threshold=threshold)
        if not batch.all_exact:
            continue  # attnsync's FlashInfer build needs exact lengths (async spec decode)
        md = attnsync.build(batch, "flashinfer", decode_threshold=threshold)
        theirs = vu.split_decodes_and_prefills(cam, decode_threshold=threshold)
        predicted = md.num_decodes + (md.num_reqs - batch.num_reqs if md.num_decodes == batch.num_reqs else 0)
        ledger.compare("V2 order (FlashInfer decode count)", f"{step.name} [V2 order]", "num_decodes",
                       predicted, int(theirs[0]))
        checked += 1
        kept = av.batch_from_vllm(cam, block_size=step.block_size, block_table_cpu=host)
        try:
            attnsync.build(kept, "flashinfer", decode_threshold=threshold)
        except attnsync.SpecError as error:
            assert "decode-first order" in str(error)
            ledger.documented("V2 order: a short prompt sorted among decodes needs short_extends_as_decodes=True "
                              "for attnsync's decode-first backends")
    assert checked >= 30
    assert_no_mismatches(ledger, before)
