/* attnsync._native: the compiled twin of attnsync's hot numpy steps (optional).
 *
 * Why it exists: on the GPU hosts every numpy call costs 1-2.5 us of interpreter and dispatch
 * overhead (results/2026-11-27-h100: "numpy add, 256 int32" probe), and a decode step's build
 * and lowering are a few dozen such calls on arrays of a few hundred elements. These functions
 * do the same work as the code they stand in for, in one call each:
 *
 *   pack(targets, sources)                 the lowering's per-field np.copyto loop
 *   decode_slots(table, positions, page, out)   attnsync._spec._decode_slots
 *   decode_rows(table, seq_lens, page, out)     a decode step's computed counts and slots
 *   token_slots(...), split_regions(...)   any batch's per-token rows and slots; its split
 *   paged_kv_counts(seq_lens, page, indptr, last) -> total    FlashInfer's indptr/last_page_len
 *   gather_pages(table, indptr, out)       FlashInfer's paged_kv_indices
 *   check_batch(...)                       attnsync.Batch's checks and copies, happy path only
 *   lower_step(fast, values), lower_users(fast)   a reused torch lowering's step
 *
 * Each is tested bit for bit against its numpy form (tests/test_native.py), and attnsync runs
 * without this module (it is built when a C compiler is present; ATTNSYNC_PURE_NUMPY=1 turns
 * it off). Only Python's C API is used: arrays arrive through the buffer protocol, so no numpy
 * headers are needed to build it; CUDA runtime functions arrive as addresses (lower_step), so
 * no CUDA headers or libraries are needed either. No function reads or writes outside the
 * buffers it is given: every index is checked, and a violation raises instead of reading past
 * the end.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* The element kind of a buffer: 'i' signed integer, 'u' unsigned integer, 'b' bool,
 * 'f' floating point, 0 anything else (other byte orders, structs, ...). */
static char kind_of(const Py_buffer *view) {
    const char *format = view->format;
    if (format == NULL) return 'u';  /* plain bytes */
    if (format[0] == '@' || format[0] == '=' || format[0] == '<') {
        uint16_t probe = 1;  /* '<' is native only on little-endian machines */
        if (format[0] == '<' && *(uint8_t *)&probe != 1) return 0;
        format++;
    }
    if (format[0] == '\0' || format[1] != '\0') return 0;
    switch (format[0]) {
        case 'b': case 'h': case 'i': case 'l': case 'q': case 'n': return 'i';
        case 'B': case 'H': case 'I': case 'L': case 'Q': case 'N': return 'u';
        case '?': return 'b';
        case 'e': case 'f': case 'd': return 'f';
        default: return 0;
    }
}

/* Whether two buffers have the same number of dimensions and the same extent in each. */
static int same_shape(const Py_buffer *a, const Py_buffer *b) {
    if (a->ndim != b->ndim) return 0;
    for (int d = 0; d < a->ndim; d++) {
        if (a->shape[d] != b->shape[d]) return 0;
    }
    return 1;
}

/* Copy one source into one target of the same shape; 0 if this pair is not one it handles
 * (the caller then leaves it, and every later pair, to np.copyto). */
static int copy_pair(Py_buffer *dst, const Py_buffer *src) {
    char dk = kind_of(dst), sk = kind_of(src);
    Py_ssize_t n = src->itemsize ? src->len / src->itemsize : 0;
    if (dk == 0 || sk == 0 || !same_shape(dst, src) || dst->len / dst->itemsize != n) return 0;
    if (dk == sk && dst->itemsize == src->itemsize) {
        memcpy(dst->buf, src->buf, (size_t)src->len);
        return 1;
    }
    /* int32 -> int64: vLLM's slot_mapping is int64 in torch, int32 on the host */
    if (dk == 'i' && dst->itemsize == 8 && src->itemsize == 4 && (sk == 'i' || sk == 'u')) {
        int64_t *out = (int64_t *)dst->buf;
        if (sk == 'i') {
            const int32_t *in = (const int32_t *)src->buf;
            for (Py_ssize_t k = 0; k < n; k++) out[k] = in[k];
        } else {
            const uint32_t *in = (const uint32_t *)src->buf;
            for (Py_ssize_t k = 0; k < n; k++) out[k] = in[k];
        }
        return 1;
    }
    /* int64 -> int32 (edited metadata, whose values the adapter checked fit): numpy's unsafe
     * cast keeps the low 32 bits, and so does this */
    if (dk == 'i' && dst->itemsize == 4 && src->itemsize == 8 && (sk == 'i' || sk == 'u')) {
        int32_t *out = (int32_t *)dst->buf;
        const uint64_t *in = (const uint64_t *)src->buf;
        for (Py_ssize_t k = 0; k < n; k++) out[k] = (int32_t)(uint32_t)in[k];
        return 1;
    }
    return 0;
}

/* Copy `source` into `target` as copy_pair does, or (shift != 0) into the bytes `shift` past
 * target's, which must lie inside [lo, hi); 0 (no error set) where either is not a
 * C-contiguous buffer or the pair is not one copy_pair handles, -1 (ValueError set) where a
 * shifted target would leave [lo, hi). */
static int pack_shifted(PyObject *target, PyObject *source, intptr_t shift, uintptr_t lo, uintptr_t hi) {
    Py_buffer dst, src;
    if (PyObject_GetBuffer(target, &dst, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) != 0) {
        PyErr_Clear();
        return 0;
    }
    if (PyObject_GetBuffer(source, &src, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) != 0) {
        PyErr_Clear();
        PyBuffer_Release(&dst);
        return 0;
    }
    int copied;
    void *own = dst.buf;
    uintptr_t start = (uintptr_t)dst.buf + (uintptr_t)shift;
    if (shift != 0 && (start < lo || start > hi || (uintptr_t)dst.len > hi - start)) {
        PyErr_SetString(PyExc_ValueError, "lower_step: a field would be packed outside the pinned table's block");
        copied = -1;
    } else {
        dst.buf = (void *)start;
        copied = copy_pair(&dst, &src);
        dst.buf = own;  /* released as it was received */
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return copied;
}

static int pack_one(PyObject *target, PyObject *source) {
    return pack_shifted(target, source, 0, 0, 0);
}

PyDoc_STRVAR(pack_doc,
"pack(targets, sources) -> int\n\n"
"Copy sources[k] into targets[k] for k = 0, 1, ... while each pair has the same shape and\n"
"either the same element type or int32 -> int64 / int64 -> int32 (numpy's unsafe cast), both\n"
"C-contiguous. Returns how many pairs it copied: the caller copies the rest with np.copyto\n"
"(which raises or casts as numpy does).");

static PyObject *pack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2 || !(PyTuple_Check(args[0]) || PyList_Check(args[0]))
        || !(PyTuple_Check(args[1]) || PyList_Check(args[1]))) {
        PyErr_SetString(PyExc_TypeError, "pack(targets, sources): expected two tuples or lists");
        return NULL;
    }
    /* both are lists or tuples, so these are the objects themselves (new references) */
    PyObject *targets = PySequence_Fast(args[0], "pack: targets"), *sources = PySequence_Fast(args[1], "pack: sources");
    if (targets == NULL || sources == NULL) {
        Py_XDECREF(targets);
        Py_XDECREF(sources);
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(targets);
    if (PySequence_Fast_GET_SIZE(sources) != count) {
        Py_DECREF(targets);
        Py_DECREF(sources);
        PyErr_SetString(PyExc_ValueError, "pack: targets and sources differ in length");
        return NULL;
    }
    Py_ssize_t k = 0;
    /* (a list's items are re-read each pass: getting a buffer runs no Python code that could
     * change the list, since numpy arrays and bytes-like objects export in C) */
    while (k < count && pack_one(PySequence_Fast_GET_ITEM(targets, k), PySequence_Fast_GET_ITEM(sources, k))) k++;
    Py_DECREF(targets);
    Py_DECREF(sources);
    return PyLong_FromSsize_t(k);
}

/* What one int32 argument must be: its position in the call, dimensions, writability, name. */
typedef struct {
    int arg;
    int ndim;
    int writable;
    const char *what;
} int32_arg;

/* The C-contiguous int32 buffers `specs` describe, all or none: on a missing or wrong one
 * (TypeError naming it) every buffer got so far is released and -1 returned. */
static int int32_buffers(PyObject *const *args, const int32_arg *specs, int count, Py_buffer *views) {
    for (int k = 0; k < count; k++) {
        int flags = PyBUF_FORMAT | PyBUF_C_CONTIGUOUS | (specs[k].writable ? PyBUF_WRITABLE : 0);
        int ok = PyObject_GetBuffer(args[specs[k].arg], &views[k], flags) == 0;
        if (ok && (kind_of(&views[k]) != 'i' || views[k].itemsize != 4 || views[k].ndim != specs[k].ndim)) {
            PyBuffer_Release(&views[k]);
            PyErr_Format(PyExc_TypeError, "%s: expected a C-contiguous int32 array of %d dimension(s)",
                         specs[k].what, specs[k].ndim);
            ok = 0;
        }
        if (!ok) {
            while (k-- > 0) PyBuffer_Release(&views[k]);
            return -1;
        }
    }
    return 0;
}

static void release_all(Py_buffer *views, int count) {
    for (int k = 0; k < count; k++) PyBuffer_Release(&views[k]);
}

/* A page size argument: a Python int >= 1, else -1 with ValueError or TypeError set. */
static long page_arg(PyObject *value, const char *function) {
    long page = PyLong_AsLong(value);
    if (page == -1 && PyErr_Occurred()) return -1;
    if (page < 1) {
        PyErr_Format(PyExc_ValueError, "%s: page must be >= 1", function);
        return -1;
    }
    return page;
}

PyDoc_STRVAR(decode_slots_doc,
"decode_slots(block_table, positions, page, out) -> None\n\n"
"out[r] = block_table[r, positions[r] // page] * page + positions[r] % page for every row r\n"
"(int32 [R, W], int32 [R] >= 0, page >= 1, int32 [R]). Raises IndexError for a position\n"
"outside its row's table.");

static PyObject *decode_slots(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    static const int32_arg specs[3] = {{0, 2, 0, "decode_slots: block_table"},
                                       {1, 1, 0, "decode_slots: positions"},
                                       {3, 1, 1, "decode_slots: out"}};
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "decode_slots(block_table, positions, page, out)");
        return NULL;
    }
    long page = page_arg(args[2], "decode_slots");
    Py_buffer views[3];
    if (page < 0 || int32_buffers(args, specs, 3, views) != 0) return NULL;
    Py_ssize_t rows = views[0].shape[0], width = views[0].shape[1];
    int failed = 0;
    if (views[1].shape[0] != rows || views[2].shape[0] != rows) {
        PyErr_SetString(PyExc_ValueError, "decode_slots: block_table, positions and out differ in rows");
        failed = 1;
    } else {
        const int32_t *t = (const int32_t *)views[0].buf, *p = (const int32_t *)views[1].buf;
        int32_t *o = (int32_t *)views[2].buf;
        for (Py_ssize_t r = 0; r < rows; r++) {
            int64_t position = p[r];
            int64_t column = position / page;
            if (position < 0 || column >= width) {
                PyErr_Format(PyExc_IndexError, "decode_slots: row %zd: position %lld is outside "
                             "its %zd pages of %ld", r, (long long)position, width, page);
                failed = 1;
                break;
            }
            /* Batch refused page ids whose slots do not fit int32: int32 arithmetic, as numpy's */
            o[r] = (int32_t)((uint32_t)t[r * width + column] * (uint32_t)page + (uint32_t)(position % page));
        }
    }
    release_all(views, 3);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(decode_rows_doc,
"decode_rows(block_table, seq_lens, page, out, pages=False) -> int\n\n"
"A one-token-per-row batch's per-row arrays in one int32 array `out` (int32 [R, W], int32 [R],\n"
"page >= 1): out[:R] = seq_lens - 1 (each row's computed tokens, which is also its new token's\n"
"position) and out[R:2R] its slot, block_table[r, p // page] * page + p % page with\n"
"p = seq_lens[r] - 1. With pages true, FlashInfer's page arrays follow (paged_kv_counts' and\n"
"gather_pages' values): out[2R:3R+1] indptr, out[3R+1:4R+1] last_page_len, the page list from\n"
"out[4R+1]; `out`\n"
"then needs 4R+1 entries and room for the pages. Returns the page total (0 without pages).\n"
"Raises IndexError for a row whose length is below 1 or whose position is outside its row's\n"
"table, ValueError where out is too short.");

static PyObject *decode_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    static const int32_arg specs[3] = {{0, 2, 0, "decode_rows: block_table"},
                                       {1, 1, 0, "decode_rows: seq_lens"},
                                       {3, 1, 1, "decode_rows: out"}};
    if (nargs != 4 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "decode_rows(block_table, seq_lens, page, out, pages=False)");
        return NULL;
    }
    int pages_too = nargs == 5 ? PyObject_IsTrue(args[4]) : 0;
    if (pages_too < 0) return NULL;
    long page = page_arg(args[2], "decode_rows");
    Py_buffer views[3];
    if (page < 0 || int32_buffers(args, specs, 3, views) != 0) return NULL;
    Py_ssize_t rows = views[0].shape[0], width = views[0].shape[1], size = views[2].shape[0];
    int64_t total = 0;
    int failed = 0;
    if (views[1].shape[0] != rows || (pages_too ? size < 4 * rows + 1 : size != 2 * rows)) {
        PyErr_SetString(PyExc_ValueError, pages_too ? "decode_rows: seq_lens must have R entries and out at least 4R+1"
                                                    : "decode_rows: seq_lens must have R entries and out 2R");
        failed = 1;
    } else {
        const int32_t *t = (const int32_t *)views[0].buf, *s = (const int32_t *)views[1].buf;
        int32_t *computed = (int32_t *)views[2].buf, *slots = computed + rows;
        int32_t *offsets = slots + rows, *fill = offsets + rows + 1, *pages_out = fill + rows;
        Py_ssize_t room = pages_too ? size - (4 * rows + 1) : 0;
        if (pages_too) offsets[0] = 0;
        for (Py_ssize_t r = 0; r < rows; r++) {
            int64_t position = (int64_t)s[r] - 1;
            int64_t column = position / page;
            if (position < 0 || column >= width) {
                PyErr_Format(PyExc_IndexError, "decode_rows: row %zd: position %lld is outside "
                             "its %zd pages of %ld", r, (long long)position, width, page);
                failed = 1;
                break;
            }
            computed[r] = (int32_t)position;
            /* int32 arithmetic, as decode_slots (Batch refused slots that do not fit) */
            slots[r] = (int32_t)((uint32_t)t[r * width + column] * (uint32_t)page + (uint32_t)(position % page));
            if (pages_too) {  /* a row of length s >= 1 has column + 1 pages, its last holding p % page + 1 */
                if (total + column + 1 > room) {
                    PyErr_Format(PyExc_ValueError, "decode_rows: row %zd's %lld pages do not fit the %zd "
                                 "entries left in out", r, (long long)(column + 1), (Py_ssize_t)(room - total));
                    failed = 1;
                    break;
                }
                fill[r] = (int32_t)(position % page + 1);
                memcpy(pages_out + total, t + r * width, (size_t)(column + 1) * sizeof(int32_t));
                total += column + 1;
                offsets[r + 1] = (int32_t)total;  /* the caller keeps R*W within int32 */
            }
        }
    }
    release_all(views, 3);
    if (failed) return NULL;
    return PyLong_FromLongLong(total);
}

PyDoc_STRVAR(paged_kv_counts_doc,
"paged_kv_counts(seq_lens, page, indptr, last_page_len) -> int\n\n"
"FlashInfer's page offsets and last-page fills: with pages[r] = ceil(seq_lens[r] / page),\n"
"indptr = [0, pages[0], pages[0] + pages[1], ...] (int32 [R+1]) and last_page_len[r] =\n"
"seq_lens[r] - (pages[r] - 1) * page, 0 for an empty row (int32 [R]). Returns indptr[R].\n"
"Raises ValueError for a negative length or a total beyond int32.");

static PyObject *paged_kv_counts(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    static const int32_arg specs[3] = {{0, 1, 0, "paged_kv_counts: seq_lens"},
                                       {2, 1, 1, "paged_kv_counts: indptr"},
                                       {3, 1, 1, "paged_kv_counts: last_page_len"}};
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "paged_kv_counts(seq_lens, page, indptr, last_page_len)");
        return NULL;
    }
    long page = page_arg(args[1], "paged_kv_counts");
    Py_buffer views[3];
    if (page < 0 || int32_buffers(args, specs, 3, views) != 0) return NULL;
    Py_ssize_t rows = views[0].shape[0];
    int64_t total = 0;
    int failed = 0;
    if (views[1].shape[0] != rows + 1 || views[2].shape[0] != rows) {
        PyErr_SetString(PyExc_ValueError, "paged_kv_counts: indptr must have R+1 entries, last_page_len R");
        failed = 1;
    } else {
        const int32_t *s = (const int32_t *)views[0].buf;
        int32_t *offsets = (int32_t *)views[1].buf, *fill = (int32_t *)views[2].buf;
        offsets[0] = 0;
        for (Py_ssize_t r = 0; r < rows; r++) {
            int64_t length = s[r];
            if (length < 0) {
                PyErr_Format(PyExc_ValueError, "paged_kv_counts: row %zd has length %lld", r, (long long)length);
                failed = 1;
                break;
            }
            int64_t pages = length ? (length - 1) / page + 1 : 0;
            fill[r] = (int32_t)(length ? length - (pages - 1) * page : 0);
            total += pages;
            if (total > INT32_MAX) {
                PyErr_SetString(PyExc_ValueError, "paged_kv_counts: more pages than int32 offsets address");
                failed = 1;
                break;
            }
            offsets[r + 1] = (int32_t)total;
        }
    }
    release_all(views, 3);
    if (failed) return NULL;
    return PyLong_FromLongLong(total);
}

PyDoc_STRVAR(gather_pages_doc,
"gather_pages(block_table, indptr, out) -> None\n\n"
"out[indptr[r] : indptr[r+1]] = block_table[r, : indptr[r+1] - indptr[r]] for every row r\n"
"(int32 [R, W], int32 [R+1], int32 [indptr[R]]). Raises ValueError where indptr decreases, a\n"
"row needs more than W pages, or out has another length.");

static PyObject *gather_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    static const int32_arg specs[3] = {{0, 2, 0, "gather_pages: block_table"},
                                       {1, 1, 0, "gather_pages: indptr"},
                                       {2, 1, 1, "gather_pages: out"}};
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "gather_pages(block_table, indptr, out)");
        return NULL;
    }
    Py_buffer views[3];
    if (int32_buffers(args, specs, 3, views) != 0) return NULL;
    Py_ssize_t rows = views[0].shape[0], width = views[0].shape[1], length = views[2].shape[0];
    const int32_t *t = (const int32_t *)views[0].buf, *offsets = (const int32_t *)views[1].buf;
    int32_t *o = (int32_t *)views[2].buf;
    int failed = 0;
    /* (the shape check comes first, so offsets[0] and offsets[rows] exist when read) */
    if (views[1].shape[0] != rows + 1 || offsets[0] != 0 || offsets[rows] != length) {
        PyErr_SetString(PyExc_ValueError, "gather_pages: indptr must have R+1 entries from 0 to len(out)");
        failed = 1;
    } else {
        for (Py_ssize_t r = 0; r < rows; r++) {
            int64_t start = offsets[r], pages = (int64_t)offsets[r + 1] - start;
            if (pages < 0 || pages > width || start + pages > length) {
                PyErr_Format(PyExc_ValueError, "gather_pages: row %zd's pages [%lld, %lld) do not "
                             "fit its %zd columns and an output of %zd", r, (long long)start,
                             (long long)(start + pages), width, length);
                failed = 1;
                break;
            }
            memcpy(o + start, t + r * width, (size_t)pages * sizeof(int32_t));
        }
    }
    release_all(views, 3);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

/* A bool array's buffer (numpy's '?', one byte an element) of `length`, C-contiguous, or 0
 * with TypeError set. */
static int bool_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t length, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) != 0) return 0;
    if (kind_of(view) != 'b' || view->itemsize != 1 || view->ndim != 1 || view->shape[0] != length) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s: expected a C-contiguous bool array of %zd entries", what, length);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(split_regions_doc,
"split_regions(query_lens, seq_lens, is_prefilling, threshold) -> (rows, tokens, decode_first)\n\n"
"The decode-first split of attnsync._spec._split in one pass: each row's region (0 decode:\n"
"query_len <= threshold and not prefilling; 1 short extend: <= threshold and prefilling; 2 long\n"
"extend: > threshold with context; 3 prefill: > threshold, seq_len <= query_len), then rows and\n"
"tokens per region as two 4-tuples of ints, and whether no decode row follows a non-decode\n"
"row. query_lens and seq_lens int32 [R]; is_prefilling bool [R] or None; threshold >= 1.");

static PyObject *split_regions(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    static const int32_arg specs[2] = {{0, 1, 0, "split_regions: query_lens"},
                                       {1, 1, 0, "split_regions: seq_lens"}};
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "split_regions(query_lens, seq_lens, is_prefilling, threshold)");
        return NULL;
    }
    long threshold = PyLong_AsLong(args[3]);
    if (threshold == -1 && PyErr_Occurred()) return NULL;
    if (threshold < 1) {
        PyErr_SetString(PyExc_ValueError, "split_regions: threshold must be >= 1");
        return NULL;
    }
    Py_buffer views[2], flags;
    if (int32_buffers(args, specs, 2, views) != 0) return NULL;
    Py_ssize_t rows = views[0].shape[0];
    int have_flags = args[2] != Py_None;
    if (views[1].shape[0] != rows) {
        release_all(views, 2);
        PyErr_SetString(PyExc_ValueError, "split_regions: query_lens and seq_lens differ in length");
        return NULL;
    }
    if (have_flags && !bool_buffer(args[2], &flags, rows, "split_regions: is_prefilling")) {
        release_all(views, 2);
        return NULL;
    }
    const int32_t *q = (const int32_t *)views[0].buf, *s = (const int32_t *)views[1].buf;
    const uint8_t *prefilling = have_flags ? (const uint8_t *)flags.buf : NULL;
    long long count[4] = {0, 0, 0, 0}, tokens[4] = {0, 0, 0, 0};
    int decode_first = 1, seen_other = 0;
    for (Py_ssize_t r = 0; r < rows; r++) {
        int region;
        if (q[r] <= threshold) {
            region = prefilling != NULL && prefilling[r] ? 1 : 0;
        } else {
            region = s[r] <= q[r] ? 3 : 2;
        }
        count[region] += 1;
        tokens[region] += q[r];
        if (region != 0) {
            seen_other = 1;
        } else if (seen_other) {
            decode_first = 0;
        }
    }
    if (have_flags) PyBuffer_Release(&flags);
    release_all(views, 2);
    return Py_BuildValue("((LLLL)(LLLL)O)", count[0], count[1], count[2], count[3], tokens[0], tokens[1],
                         tokens[2], tokens[3], decode_first ? Py_True : Py_False);
}

PyDoc_STRVAR(token_slots_doc,
"token_slots(query_lens, num_computed, block_table, page, exact, token_to_req, slots) -> None\n\n"
"The per-token fields of a batch with any query lengths: for row r's i-th new token (rows in\n"
"order, tokens in order), token_to_req = r and, at position p = num_computed[r] + i, slot =\n"
"block_table[r, p // page] * page + p % page, or -1 where exact is given and exact[r] is False.\n"
"query_lens, num_computed int32 [R]; block_table int32 [R', W] with R' >= R; exact bool [R] or\n"
"None; token_to_req and slots int32 [sum(query_lens)]. Raises IndexError for a position outside\n"
"its row's table, ValueError for lengths that do not agree.");

static PyObject *token_slots(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    static const int32_arg specs[5] = {{0, 1, 0, "token_slots: query_lens"},
                                       {1, 1, 0, "token_slots: num_computed"},
                                       {2, 2, 0, "token_slots: block_table"},
                                       {5, 1, 1, "token_slots: token_to_req"},
                                       {6, 1, 1, "token_slots: slots"}};
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "token_slots(query_lens, num_computed, block_table, page, exact, token_to_req, slots)");
        return NULL;
    }
    long page = page_arg(args[3], "token_slots");
    Py_buffer views[5], flags;
    if (page < 0 || int32_buffers(args, specs, 5, views) != 0) return NULL;
    Py_ssize_t rows = views[0].shape[0], width = views[2].shape[1], tokens = views[3].shape[0];
    int have_flags = args[4] != Py_None;
    if (have_flags && !bool_buffer(args[4], &flags, rows, "token_slots: exact")) {
        release_all(views, 5);
        return NULL;
    }
    int failed = 0;
    if (views[1].shape[0] != rows || views[2].shape[0] < rows || views[4].shape[0] != tokens) {
        PyErr_SetString(PyExc_ValueError, "token_slots: num_computed must have R entries, block_table at least "
                                          "R rows, and token_to_req and slots one length");
        failed = 1;
    } else {
        const int32_t *q = (const int32_t *)views[0].buf, *done = (const int32_t *)views[1].buf;
        const int32_t *t = (const int32_t *)views[2].buf;
        int32_t *owner = (int32_t *)views[3].buf, *out = (int32_t *)views[4].buf;
        const uint8_t *exact = have_flags ? (const uint8_t *)flags.buf : NULL;
        Py_ssize_t k = 0;
        for (Py_ssize_t r = 0; r < rows && !failed; r++) {
            if (q[r] < 0 || k + q[r] > tokens) {
                PyErr_Format(PyExc_ValueError, "token_slots: row %zd's %d tokens do not fit the %zd outputs",
                             r, (int)q[r], tokens);
                failed = 1;
                break;
            }
            int keep = exact == NULL || exact[r];
            for (int32_t i = 0; i < q[r]; i++, k++) {
                int64_t position = (int64_t)done[r] + i;
                int64_t column = position / page;
                if (position < 0 || column >= width) {
                    PyErr_Format(PyExc_IndexError, "token_slots: row %zd: position %lld is outside its %zd "
                                 "pages of %ld", r, (long long)position, width, page);
                    failed = 1;
                    break;
                }
                owner[k] = (int32_t)r;
                /* int32 arithmetic, as decode_slots (Batch refused slots that do not fit) */
                out[k] = keep ? (int32_t)((uint32_t)t[r * width + column] * (uint32_t)page
                                          + (uint32_t)(position % page)) : -1;
            }
        }
        if (!failed && k != tokens) {
            PyErr_Format(PyExc_ValueError, "token_slots: the rows hold %zd tokens, the outputs %zd", k, tokens);
            failed = 1;
        }
    }
    if (have_flags) PyBuffer_Release(&flags);
    release_all(views, 5);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

/* The block table's copy and its largest entry seen as uint32 (a negative page id is >= 2**31),
 * in one pass over the table: with AVX2 where the CPU has it (baseline x86-64 has no unsigned
 * 32-bit vector max, and a scalar loop took 62 us for 512 KB on the CPU host where numpy's
 * runtime-dispatched AVX2 took 3 us). Returns 1 with *best set, or 0 having only copied (the
 * caller then asks numpy for the maximum). */
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ATTNSYNC_HAVE_AVX2_PATH 1
__attribute__((target("avx2"))) static uint32_t copy_max_avx2(uint32_t *dst, const uint32_t *src, Py_ssize_t n) {
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
    Py_ssize_t k = 0;
    for (; k + 16 <= n; k += 16) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(src + k));
        __m256i y = _mm256_loadu_si256((const __m256i *)(src + k + 8));
        _mm256_storeu_si256((__m256i *)(dst + k), x);
        _mm256_storeu_si256((__m256i *)(dst + k + 8), y);
        a = _mm256_max_epu32(a, x);
        b = _mm256_max_epu32(b, y);
    }
    uint32_t lanes[8], best = 0;
    _mm256_storeu_si256((__m256i *)lanes, _mm256_max_epu32(a, b));
    for (int i = 0; i < 8; i++) best = lanes[i] > best ? lanes[i] : best;
    for (; k < n; k++) {
        dst[k] = src[k];
        best = src[k] > best ? src[k] : best;
    }
    return best;
}
#endif

static int copy_table(void *dst, const void *src, Py_ssize_t nbytes, uint32_t *best) {
#ifdef ATTNSYNC_HAVE_AVX2_PATH
    if (__builtin_cpu_supports("avx2")) {
        *best = copy_max_avx2((uint32_t *)dst, (const uint32_t *)src, nbytes / (Py_ssize_t)sizeof(uint32_t));
        return 1;
    }
#endif
    memcpy(dst, src, (size_t)nbytes);
    (void)best;
    return 0;
}

PyDoc_STRVAR(check_batch_doc,
"check_batch(query_lens, seq_lens, block_table, query_out, seq_out, table_out) -> tuple | None\n\n"
"The happy path of attnsync.Batch's checks on int32 C-contiguous arrays ([R], [R], [R, W]):\n"
"copies each into its `*_out` (same shapes) and returns (total query tokens, max query_len,\n"
"max seq_len, the table's largest entry seen as uint32, or None where this CPU lacks the\n"
"vector path: numpy finds it then); the table's values are not checked. Returns None,\n"
"having checked nothing, when an input is not such an array, the row counts differ, or a\n"
"row has a negative length or query_len > seq_len: the numpy checks then name the problem.");

/* An int32 C-contiguous buffer of `ndim` dimensions, or 0 (no error set: not such an array). */
static int plain_int32(PyObject *obj, Py_buffer *view, int ndim, int writable) {
    int flags = PyBUF_FORMAT | PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) != 0) {
        PyErr_Clear();
        return 0;
    }
    if (kind_of(view) != 'i' || view->itemsize != 4 || view->ndim != ndim) {
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

static PyObject *check_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    static const int ndims[6] = {1, 1, 2, 1, 1, 2};
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "check_batch(query_lens, seq_lens, block_table, query_out, seq_out, table_out)");
        return NULL;
    }
    Py_buffer views[6];
    int got = 0;
    while (got < 6 && plain_int32(args[got], &views[got], ndims[got], got >= 3)) got++;
    if (got < 6) {
        release_all(views, got);
        if (got >= 3) {  /* the outputs are attnsync's own: a mismatch is a bug, not bad input */
            PyErr_SetString(PyExc_TypeError, "check_batch: the outputs must be writable int32 arrays");
            return NULL;
        }
        Py_RETURN_NONE;
    }
    Py_ssize_t rows = views[0].shape[0];
    PyObject *result = NULL;
    if (views[1].shape[0] != rows || views[2].shape[0] != rows) {
        release_all(views, 6);
        Py_RETURN_NONE;
    }
    if (views[3].len != views[0].len || views[4].len != views[1].len || views[5].len != views[2].len
        || views[5].shape[1] != views[2].shape[1]) {
        release_all(views, 6);
        PyErr_SetString(PyExc_ValueError, "check_batch: each output must have its input's shape");
        return NULL;
    }
    const int32_t *q = (const int32_t *)views[0].buf, *s = (const int32_t *)views[1].buf;
    int64_t total = 0;
    int32_t max_q = 0, max_s = 0;
    int ok = 1;
    for (Py_ssize_t r = 0; r < rows; r++) {
        if (q[r] < 0 || s[r] < 0 || q[r] > s[r]) {
            ok = 0;
            break;
        }
        total += q[r];
        if (q[r] > max_q) max_q = q[r];
        if (s[r] > max_s) max_s = s[r];
    }
    if (ok) {
        memcpy(views[3].buf, views[0].buf, (size_t)views[0].len);
        memcpy(views[4].buf, views[1].buf, (size_t)views[1].len);
        uint32_t max_page = 0;
        if (copy_table(views[5].buf, views[2].buf, views[2].len, &max_page)) {
            result = Py_BuildValue("(LiiK)", (long long)total, (int)max_q, (int)max_s, (unsigned long long)max_page);
        } else {
            result = Py_BuildValue("(LiiO)", (long long)total, (int)max_q, (int)max_s, Py_None);
        }
    }
    release_all(views, 6);
    if (!ok) Py_RETURN_NONE;
    return result;
}

/* ------------------------------------------------------------------------------------------
 * The reused torch lowering's whole step (attnsync/adapters/torch.py, _Reusable.fast).
 *
 * Why: after the pool lookup, a reused lowering is a handful of steps that each cost a
 * microsecond or more of interpreter time on the GPU hosts (results/2026-11-27-h100, run 58:
 * its users count 1.2 us, the event query 0.5-1.6, the pack 3.8, the device check 0.3, the
 * copy 3.4, the event record 1.2, the 16 scalar fields 1.4, on an H200 host). Here they are
 * one call. The CUDA runtime functions are the ones torch loaded (their addresses come from
 * attnsync.adapters._cudart), called with the entry's own memory, stream and event: the same
 * calls, in the same order, as the Python path makes.
 */
typedef int (*cuda_memcpy_async_t)(void *, const void *, size_t, int, void *);
typedef int (*cuda_event_record_t)(void *, void *);
typedef int (*cuda_event_query_t)(void *);
typedef int (*cuda_get_device_t)(int *);
typedef int (*cuda_get_last_error_t)(void);
typedef const char *(*cuda_get_error_string_t)(int);

enum { FAST_LOWERED, FAST_HELD, FAST_STORAGES, FAST_USE_COUNT, FAST_BASELINE, FAST_TARGETS, FAST_SOURCES,
       FAST_SCALARS, FAST_FIELDS, FAST_CUDA, FAST_SIZE };
enum { CUDA_MEMCPY, CUDA_RECORD, CUDA_QUERY, CUDA_GET_DEVICE, CUDA_LAST_ERROR, CUDA_ERROR_STRING, CUDA_DST,
       CUDA_SRC, CUDA_NBYTES, CUDA_STREAM, CUDA_EVENT, CUDA_DEVICE, CUDA_SIZE };
#define CUDA_SUCCESS_ 0
#define CUDA_ERROR_NOT_READY_ 600

/* The entry's `fast` tuple, checked for its shape (its contents are attnsync's own). */
static int fast_tuple(PyObject *fast) {
    if (!PyTuple_Check(fast) || PyTuple_GET_SIZE(fast) != FAST_SIZE || !PyList_Check(PyTuple_GET_ITEM(fast, FAST_HELD))
        || !PyTuple_Check(PyTuple_GET_ITEM(fast, FAST_STORAGES)) || !PyList_Check(PyTuple_GET_ITEM(fast, FAST_BASELINE))
        || PyList_GET_SIZE(PyTuple_GET_ITEM(fast, FAST_BASELINE)) != 1 || !PyList_Check(PyTuple_GET_ITEM(fast, FAST_TARGETS))
        || !PyTuple_Check(PyTuple_GET_ITEM(fast, FAST_SOURCES)) || !PyTuple_Check(PyTuple_GET_ITEM(fast, FAST_SCALARS))
        || !PyDict_Check(PyTuple_GET_ITEM(fast, FAST_FIELDS))
        || PyList_GET_SIZE(PyTuple_GET_ITEM(fast, FAST_TARGETS)) != PyTuple_GET_SIZE(PyTuple_GET_ITEM(fast, FAST_SOURCES))) {
        PyErr_SetString(PyExc_TypeError, "lower_step: not a reusable lowering's fast tuple");
        return 0;
    }
    PyObject *cuda = PyTuple_GET_ITEM(fast, FAST_CUDA);
    if (cuda != Py_None && (!PyTuple_Check(cuda) || PyTuple_GET_SIZE(cuda) != CUDA_SIZE)) {
        PyErr_SetString(PyExc_TypeError, "lower_step: the CUDA part must be None or a tuple of 12 ints");
        return 0;
    }
    return 1;
}

/* References to the lowering and its tensors plus the use counts of its storages: what
 * _Reusable.users() counts (with this module's own offsets, so a baseline taken here is only
 * ever compared with a count taken here). -1 with an exception set on failure. */
static long long users_of(PyObject *fast) {
    long long users = (long long)Py_REFCNT(PyTuple_GET_ITEM(fast, FAST_LOWERED));
    PyObject *held = PyTuple_GET_ITEM(fast, FAST_HELD);
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(held); k++) users += (long long)Py_REFCNT(PyList_GET_ITEM(held, k));
    PyObject *storages = PyTuple_GET_ITEM(fast, FAST_STORAGES), *use_count = PyTuple_GET_ITEM(fast, FAST_USE_COUNT);
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(storages); k++) {
        PyObject *count = PyObject_CallOneArg(use_count, PyTuple_GET_ITEM(storages, k));
        if (count == NULL) return -1;
        long long value = PyLong_AsLongLong(count);
        Py_DECREF(count);
        if (value == -1 && PyErr_Occurred()) return -1;
        users += value;
    }
    return users;
}

PyDoc_STRVAR(lower_users_doc,
"lower_users(fast) -> int\n\n"
"The users count lower_step compares with fast's baseline (see attnsync/adapters/torch.py).");

static PyObject *lower_users(PyObject *self, PyObject *fast) {
    (void)self;
    if (!fast_tuple(fast)) return NULL;
    long long users = users_of(fast);
    return users < 0 ? NULL : PyLong_FromLongLong(users);
}

/* A pointer-sized unsigned int from an int object; sets an exception (and returns 0) if not. */
static uintptr_t address_of(PyObject *cuda, int index) {
    return (uintptr_t)PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(cuda, index));
}

/* Raise RuntimeError for a failed CUDA call, after clearing the runtime's last error (so
 * torch's next launch check does not report it as its own), as _cudart.Runtime._fail does. */
static PyObject *cuda_failed(const uintptr_t *fn, const char *call, int status) {
    ((cuda_get_last_error_t)fn[CUDA_LAST_ERROR])();
    const char *message = ((cuda_get_error_string_t)fn[CUDA_ERROR_STRING])(status);
    PyErr_Format(PyExc_RuntimeError, "%s failed with CUDA error %d (%s) while lowering attnsync metadata.",
                 call, status, message ? message : "unknown");
    return NULL;
}

PyDoc_STRVAR(lower_step_doc,
"lower_step(fast, values[, table]) -> int\n\n"
"One reused lowering's step (attnsync/adapters/torch.py, _Reusable.fast): when its users count\n"
"equals the baseline and (on CUDA) its event has completed, pack values[sources[k]] into\n"
"targets[k] (as pack does), then on CUDA queue the copy and record the event, and set the\n"
"scalar fields. Returns -2 when all of that is done; -1 when the entry is held or its copy\n"
"pending (nothing done); k >= 0 when it packed k pairs and did nothing after (a pair it does\n"
"not handle, or another device current): the caller does the rest.\n\n"
"table = (address, capacity, num_staged, skip), CUDA only: the block table already lies at\n"
"`address`, the start of a pinned block of `capacity` bytes (attnsync's pinned tables). The\n"
"first num_staged targets (in the entry's pinned buffer) are packed at the same offsets in that\n"
"block instead, pair `skip` (the table) is not packed, and the copy reads the block; the entry's\n"
"event is not waited for (its pinned buffer is not written). Here every\n"
"outcome but -2 is -1: the caller then lowers the usual way, and nothing it reads was changed.");

static PyObject *lower_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs < 2 || nargs > 3 || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "lower_step(fast, values[, table]): values must be a dict");
        return NULL;
    }
    PyObject *fast = args[0], *values = args[1];
    if (!fast_tuple(fast)) return NULL;
    /* the pinned table's block: where the staged fields go and the copy reads from */
    int on_table = nargs == 3 && args[2] != Py_None;
    uintptr_t block = 0, capacity = 0;
    Py_ssize_t num_staged = 0, skip = -1;
    if (on_table) {
        PyObject *table = args[2];
        if (!PyTuple_Check(table) || PyTuple_GET_SIZE(table) != 4 || PyTuple_GET_ITEM(fast, FAST_CUDA) == Py_None) {
            PyErr_SetString(PyExc_TypeError, "lower_step: table must be (address, capacity, num_staged, skip), on CUDA only");
            return NULL;
        }
        block = address_of(table, 0);
        capacity = address_of(table, 1);
        num_staged = PyLong_AsSsize_t(PyTuple_GET_ITEM(table, 2));
        skip = PyLong_AsSsize_t(PyTuple_GET_ITEM(table, 3));
        if (PyErr_Occurred()) return NULL;
    }
    long long users = users_of(fast);
    if (users < 0) return NULL;
    long long baseline = PyLong_AsLongLong(PyList_GET_ITEM(PyTuple_GET_ITEM(fast, FAST_BASELINE), 0));
    if (baseline == -1 && PyErr_Occurred()) return NULL;
    if (users != baseline) return PyLong_FromLong(-1);

    PyObject *cuda = PyTuple_GET_ITEM(fast, FAST_CUDA);
    uintptr_t fn[CUDA_SIZE] = {0};
    if (cuda != Py_None) {
        for (int k = 0; k < CUDA_SIZE; k++) fn[k] = address_of(cuda, k);
        if (PyErr_Occurred()) return NULL;
        /* On a pinned table the entry's pinned buffer is not written, so its last copy need not be
         * done: the block's own guard is its caller's (attnsync/adapters/_pinned_tables.py). */
        int status = on_table ? CUDA_SUCCESS_ : ((cuda_event_query_t)fn[CUDA_QUERY])((void *)fn[CUDA_EVENT]);
        if (status == CUDA_ERROR_NOT_READY_) {  /* its last copy may still read the pinned buffer */
            ((cuda_get_last_error_t)fn[CUDA_LAST_ERROR])();  /* (not an error; torch clears it too) */
            return PyLong_FromLong(-1);
        }
        if (status != CUDA_SUCCESS_) return cuda_failed(fn, "cudaEventQuery", status);
        if (on_table && fn[CUDA_NBYTES] > capacity) {
            PyErr_SetString(PyExc_ValueError, "lower_step: the entry's copy is larger than the pinned table's block");
            return NULL;
        }
    }

    PyObject *targets = PyTuple_GET_ITEM(fast, FAST_TARGETS), *sources = PyTuple_GET_ITEM(fast, FAST_SOURCES);
    Py_ssize_t count = PyList_GET_SIZE(targets);
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *source = PyDict_GetItemWithError(values, PyTuple_GET_ITEM(sources, k));
        if (source == NULL) {
            if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, PyTuple_GET_ITEM(sources, k));
            return NULL;
        }
        if (!on_table) {
            if (!pack_one(PyList_GET_ITEM(targets, k), source)) return PyLong_FromSsize_t(k);
            continue;
        }
        if (k == skip) continue;  /* the table, in place already */
        int copied = k < num_staged
            ? pack_shifted(PyList_GET_ITEM(targets, k), source, (intptr_t)(block - fn[CUDA_SRC]), block, block + capacity)
            : pack_one(PyList_GET_ITEM(targets, k), source);  /* host mirrors: their own memory */
        if (copied < 0) return NULL;
        if (copied == 0) return PyLong_FromLong(-1);
    }

    if (cuda != Py_None) {
        int device = -1;
        if (((cuda_get_device_t)fn[CUDA_GET_DEVICE])(&device) != CUDA_SUCCESS_ || device != (int)fn[CUDA_DEVICE]) {
            /* another device current: torch's copy_ (which sets its own device guard) does it */
            ((cuda_get_last_error_t)fn[CUDA_LAST_ERROR])();
            return PyLong_FromSsize_t(on_table ? -1 : count);
        }
        int status = ((cuda_memcpy_async_t)fn[CUDA_MEMCPY])((void *)fn[CUDA_DST],
                                                           (const void *)(on_table ? block : fn[CUDA_SRC]),
                                                           (size_t)fn[CUDA_NBYTES], 1 /* host to device */,
                                                           (void *)fn[CUDA_STREAM]);
        if (status != CUDA_SUCCESS_) return cuda_failed(fn, "cudaMemcpyAsync", status);
        status = ((cuda_event_record_t)fn[CUDA_RECORD])((void *)fn[CUDA_EVENT], (void *)fn[CUDA_STREAM]);
        if (status != CUDA_SUCCESS_) return cuda_failed(fn, "cudaEventRecord", status);
    }

    PyObject *scalars = PyTuple_GET_ITEM(fast, FAST_SCALARS), *fields = PyTuple_GET_ITEM(fast, FAST_FIELDS);
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(scalars); k++) {
        PyObject *name = PyTuple_GET_ITEM(scalars, k);
        PyObject *value = PyDict_GetItemWithError(values, name);
        if (value == NULL) {
            if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, name);
            return NULL;
        }
        if (PyDict_SetItem(fields, name, value) != 0) return NULL;
    }
    return PyLong_FromLong(-2);
}

static PyMethodDef methods[] = {
    {"check_batch", (PyCFunction)(void (*)(void))check_batch, METH_FASTCALL, check_batch_doc},
    {"pack", (PyCFunction)(void (*)(void))pack, METH_FASTCALL, pack_doc},
    {"decode_slots", (PyCFunction)(void (*)(void))decode_slots, METH_FASTCALL, decode_slots_doc},
    {"decode_rows", (PyCFunction)(void (*)(void))decode_rows, METH_FASTCALL, decode_rows_doc},
    {"lower_step", (PyCFunction)(void (*)(void))lower_step, METH_FASTCALL, lower_step_doc},
    {"lower_users", (PyCFunction)lower_users, METH_O, lower_users_doc},
    {"paged_kv_counts", (PyCFunction)(void (*)(void))paged_kv_counts, METH_FASTCALL, paged_kv_counts_doc},
    {"gather_pages", (PyCFunction)(void (*)(void))gather_pages, METH_FASTCALL, gather_pages_doc},
    {"split_regions", (PyCFunction)(void (*)(void))split_regions, METH_FASTCALL, split_regions_doc},
    {"token_slots", (PyCFunction)(void (*)(void))token_slots, METH_FASTCALL, token_slots_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "attnsync._native",
    "The compiled twin of attnsync's hot numpy steps (see attnsync/_accel.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

/* Bumped whenever a function is added or changes behaviour: attnsync/_accel.py ignores a module
 * built from an older source (a stale build in a checkout) instead of calling what it lacks. */
#define ATTNSYNC_NATIVE_VERSION 7

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "VERSION", ATTNSYNC_NATIVE_VERSION) != 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
