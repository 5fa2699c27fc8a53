/* attnsync._native: the compiled twin of attnsync's hot numpy steps (optional).
 *
 * Why it exists: a numpy call costs interpreter and dispatch overhead whatever its size, and
 * a serving step's build would be a few dozen such calls on arrays of a few hundred elements.
 * Each function here does, in one call, what one field's numpy form in attnsync/_fields.py does
 * in several (attnsync/_fields.py names the field; its numpy form is the reference):
 *
 *   slot_mapping(...)                      _fields.slot_mapping
 *   token_to_req(...)                      _fields.token_to_req
 *   region_split(...)                      _fields.region_split
 *   paged_kv_indptr(seq_lens, page)        _fields.paged_kv_indptr
 *   paged_kv_last_page_len(seq_lens, page) _fields.paged_kv_last_page_len
 *   paged_kv_indices(table, indptr)        _fields.paged_kv_indices
 *   check_batch(...)                       attnsync.Batch's checks and copies, happy path only
 *   pack(targets, sources)                 the torch lowering's per-field np.copyto loop
 *
 * The field functions write their array into a new `bytes` object and return numpy's view of
 * it (np.frombuffer, called from here): read-only from the start, so no allocation call and no
 * freeze in Python. They take only their happy path's input: where an input is not a
 * C-contiguous int32 (or bool) array of its dimensions they return None, and the numpy form
 * runs on it.
 *
 * Each is tested bit for bit against its numpy form (tests/test_native.py), and attnsync runs
 * without this module (it is built when a C compiler is present; ATTNSYNC_PURE_NUMPY=1 turns
 * it off). Only Python's C API is used: arrays arrive through the buffer protocol, so no numpy
 * headers are needed to build it. No function reads or writes outside the buffers it is given:
 * every index is checked, and a violation raises instead of reading past the end.
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


/* Copy `source` into `target` as copy_pair does; 0 (no error set) where either is not a
 * C-contiguous buffer or the pair is not one copy_pair handles. */
static int pack_one(PyObject *target, PyObject *source) {
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
    int copied = copy_pair(&dst, &src);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return copied;
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

/* What one int32 argument must be: its position in the call and its dimensions. */
typedef struct {
    int arg;
    int ndim;
} int32_arg;

/* The C-contiguous int32 buffers `specs` describe, all or none: 0 when every one is such a
 * buffer; -1, with no error set and every buffer got so far released, when one is not (the
 * caller returns None, and the numpy form runs on such input). */
static int int32_buffers(PyObject *const *args, const int32_arg *specs, int count, Py_buffer *views) {
    for (int k = 0; k < count; k++) {
        int ok = PyObject_GetBuffer(args[specs[k].arg], &views[k], PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) == 0;
        if (!ok) {
            PyErr_Clear();
        } else if (kind_of(&views[k]) != 'i' || views[k].itemsize != 4 || views[k].ndim != specs[k].ndim) {
            PyBuffer_Release(&views[k]);
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

/* numpy.frombuffer and numpy.dtype("int32"), looked up once (module init). */
static PyObject *frombuffer, *int32_dtype;

/* A new bytes object of `count` int32 entries, to be filled before it is wrapped (a bytes
 * object nothing else has seen yet may be written), or NULL with MemoryError set. */
static PyObject *new_int32s(Py_ssize_t count, int32_t **data) {
    PyObject *made = PyBytes_FromStringAndSize(NULL, count * (Py_ssize_t)sizeof(int32_t));
    if (made != NULL) *data = (int32_t *)PyBytes_AS_STRING(made);
    return made;
}

/* The filled bytes object `made` (its reference taken) as a numpy int32 array over it:
 * read-only, since bytes are immutable, and made without a copy. NULL passes through. */
static PyObject *as_array(PyObject *made) {
    if (made == NULL || made == Py_None) return made;
    PyObject *args[2] = {made, int32_dtype};
    PyObject *array = PyObject_Vectorcall(frombuffer, args, 2, NULL);
    Py_DECREF(made);
    return array;
}

/* A page size, with its shift when it is a power of two (most page sizes are): the slot
 * formula's division is then a shift, several times cheaper per token than a division. */
typedef struct {
    int64_t size;
    int shift;  /* log2(size), or -1 when size is not a power of two */
} paging;

static paging paging_of(long page) {
    paging p = {page, -1};
    if ((page & (page - 1)) == 0) {
        p.shift = 0;
        while (((int64_t)1 << p.shift) < page) p.shift++;
    }
    return p;
}

/* The page (column of the block-table row) that holds `position` >= 0. */
static inline int64_t column_of(paging p, int64_t position) {
    return p.shift >= 0 ? position >> p.shift : position / p.size;
}

/* The slot formula, the one compiled form of it: the cache slot of `position` in a row whose
 * page ids are `row`, row[position / page] * page + position % page, with the page (column)
 * holding it already found (column_of). The caller has checked 0 <= position and column < the
 * row's width. Batch refused page ids whose slots do not fit int32, so the arithmetic is
 * numpy's int32 arithmetic (wrapping, never reached). */
static inline int32_t slot_of(const int32_t *row, int64_t column, int64_t position, paging p) {
    return (int32_t)((uint32_t)row[column] * (uint32_t)p.size + (uint32_t)(position - column * p.size));
}

PyDoc_STRVAR(slot_mapping_doc,
"slot_mapping(query_lens, seq_lens, block_table, page, exact, num_padded_tokens) -> numpy.ndarray | None\n\n"
"attnsync._fields.slot_mapping: for row r's i-th new token (rows in order, tokens in order), at\n"
"position p = seq_lens[r] - query_lens[r] + i, the slot block_table[r, p // page] * page +\n"
"p % page, or -1 where exact is given and exact[r] is False; -1 for the tokens past\n"
"sum(query_lens) up to num_padded_tokens. query_lens, seq_lens int32 [n]; block_table int32\n"
"[n', W], n' >= n; exact bool [n] or None. Returns num_padded_tokens int32 (read-only); None where\n"
"an input is not such an array. Raises IndexError for a position outside its row's table,\n"
"ValueError for lengths that do not agree.");

/* A C-contiguous bool buffer (numpy's '?', one byte an element) of `length`: 1, or 0 with no
 * error set when `obj` is not one (the caller returns None, as for int32_buffers). */
static int bool_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t length) {
    if (PyObject_GetBuffer(obj, view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) != 0) {
        PyErr_Clear();
        return 0;
    }
    if (kind_of(view) != 'b' || view->itemsize != 1 || view->ndim != 1 || view->shape[0] != length) {
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

static PyObject *slot_mapping(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    static const int32_arg specs[3] = {{0, 1}, {1, 1}, {2, 2}};
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "slot_mapping(query_lens, seq_lens, block_table, page, exact, num_padded_tokens)");
        return NULL;
    }
    long page = page_arg(args[3], "slot_mapping");
    if (page < 0) return NULL;
    paging pages = paging_of(page);
    Py_ssize_t tokens = PyLong_AsSsize_t(args[5]);
    if (tokens == -1 && PyErr_Occurred()) return NULL;
    if (tokens < 0) {
        PyErr_SetString(PyExc_ValueError, "slot_mapping: num_padded_tokens must be >= 0");
        return NULL;
    }
    Py_buffer views[3], flags;
    if (int32_buffers(args, specs, 3, views) != 0) Py_RETURN_NONE;
    Py_ssize_t rows = views[0].shape[0], width = views[2].shape[1];
    int have_flags = args[4] != Py_None;
    if (have_flags && !bool_buffer(args[4], &flags, rows)) {
        release_all(views, 3);
        Py_RETURN_NONE;
    }
    int32_t *out = NULL;
    PyObject *made = NULL;
    if (views[1].shape[0] != rows || views[2].shape[0] < rows) {
        PyErr_SetString(PyExc_ValueError, "slot_mapping: seq_lens must have n entries and block_table at least n rows");
    } else if ((made = new_int32s(tokens, &out)) != NULL) {
        /* (restrict: the output is a new bytes object, so it aliases no input) */
        const int32_t *restrict q = (const int32_t *)views[0].buf, *restrict s = (const int32_t *)views[1].buf;
        const int32_t *restrict t = (const int32_t *)views[2].buf;
        const uint8_t *restrict exact = have_flags ? (const uint8_t *)flags.buf : NULL;
        int32_t *restrict slots = out;
        Py_ssize_t k = 0;
        for (Py_ssize_t r = 0; r < rows; r++) {
            int64_t count = q[r], last = (int64_t)s[r] - 1, start = last + 1 - count;
            if (count == 0) continue;
            int64_t last_column = column_of(pages, last);
            if (count < 0 || start < 0 || k + count > tokens || last_column >= width) {
                PyErr_Format(count < 0 || start < 0 || k + count > tokens ? PyExc_ValueError : PyExc_IndexError,
                             "slot_mapping: row %zd (query_len %lld, seq_len %d) does not fit its %zd pages of "
                             "%ld or the %zd tokens", r, (long long)count, (int)s[r], width, page, tokens);
                Py_CLEAR(made);
                break;
            }
            const int32_t *row = t + r * width;
            if (exact != NULL && !exact[r]) {
                for (int64_t i = 0; i < count; i++) slots[k++] = -1;
            } else if (count == 1) {  /* a decode row: its one position's page is found already */
                slots[k++] = slot_of(row, last_column, last, pages);
            } else {
                for (int64_t p = start; p <= last; p++) slots[k++] = slot_of(row, column_of(pages, p), p, pages);
            }
        }
        if (made != NULL) {
            for (; k < tokens; k++) slots[k] = -1;
        }
    }
    if (have_flags) PyBuffer_Release(&flags);
    release_all(views, 3);
    return as_array(made);
}

PyDoc_STRVAR(token_to_req_doc,
"token_to_req(query_lens, num_rows, num_padded_tokens) -> numpy.ndarray | None\n\n"
"attnsync._fields.token_to_req: row r repeated query_lens[r] times for r = 0, 1, ..., then\n"
"num_rows for the tokens past sum(query_lens) up to num_padded_tokens (query_lens int32 [n]).\n"
"Returns num_padded_tokens int32 (read-only); None where query_lens is not a C-contiguous int32\n"
"array. Raises ValueError where the rows hold more tokens.");

static PyObject *token_to_req(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    static const int32_arg specs[1] = {{0, 1}};
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "token_to_req(query_lens, num_rows, num_padded_tokens)");
        return NULL;
    }
    long long padding_row = PyLong_AsLongLong(args[1]);
    if (padding_row == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t tokens = PyLong_AsSsize_t(args[2]);
    if (tokens == -1 && PyErr_Occurred()) return NULL;
    if (tokens < 0 || padding_row < 0 || padding_row > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "token_to_req: num_rows and num_padded_tokens must be in [0, 2**31)");
        return NULL;
    }
    Py_buffer views[1];
    if (int32_buffers(args, specs, 1, views) != 0) Py_RETURN_NONE;
    int32_t *out = NULL;
    PyObject *made = new_int32s(tokens, &out);
    if (made != NULL) {
        const int32_t *q = (const int32_t *)views[0].buf;
        Py_ssize_t rows = views[0].shape[0], k = 0;
        for (Py_ssize_t r = 0; r < rows; r++) {
            if (q[r] < 0 || k + q[r] > tokens) {
                PyErr_Format(PyExc_ValueError, "token_to_req: row %zd's %d tokens do not fit the %zd tokens",
                             r, (int)q[r], tokens);
                Py_CLEAR(made);
                break;
            }
            for (int32_t i = 0; i < q[r]; i++) out[k++] = (int32_t)r;
        }
        if (made != NULL) {
            for (; k < tokens; k++) out[k] = (int32_t)padding_row;
        }
    }
    release_all(views, 1);
    return as_array(made);
}

/* Pages of a row of `length` tokens, ceil(length / page); the caller has checked length >= 0. */
static inline int64_t pages_of(int64_t length, paging p) {
    return length ? column_of(p, length - 1) + 1 : 0;
}

PyDoc_STRVAR(paged_kv_indptr_doc,
"paged_kv_indptr(seq_lens, page) -> numpy.ndarray | None\n\n"
"attnsync._fields.paged_kv_indptr: [0, pages[0], pages[0] + pages[1], ...] with pages[r] =\n"
"ceil(seq_lens[r] / page) (seq_lens int32 [R]), R+1 int32 (read-only); None when the total does\n"
"not fit int32 (the numpy form names that) or seq_lens is not a C-contiguous int32 array.\n"
"Raises ValueError for a negative length.");

static PyObject *paged_kv_indptr(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    static const int32_arg specs[1] = {{0, 1}};
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "paged_kv_indptr(seq_lens, page)");
        return NULL;
    }
    long page = page_arg(args[1], "paged_kv_indptr");
    paging pages = paging_of(page);
    Py_buffer views[1];
    if (page < 0) return NULL;
    if (int32_buffers(args, specs, 1, views) != 0) Py_RETURN_NONE;
    Py_ssize_t rows = views[0].shape[0];
    int32_t *out = NULL;
    PyObject *made = new_int32s(rows + 1, &out);
    if (made != NULL) {
        const int32_t *s = (const int32_t *)views[0].buf;
        int64_t total = 0;
        out[0] = 0;
        for (Py_ssize_t r = 0; r < rows; r++) {
            if (s[r] < 0) {
                PyErr_Format(PyExc_ValueError, "paged_kv_indptr: row %zd has length %d", r, (int)s[r]);
                Py_CLEAR(made);
                break;
            }
            total += pages_of(s[r], pages);
            if (total > INT32_MAX) {
                Py_CLEAR(made);
                made = Py_NewRef(Py_None);
                break;
            }
            out[r + 1] = (int32_t)total;
        }
    }
    release_all(views, 1);
    return as_array(made);
}

PyDoc_STRVAR(paged_kv_last_page_len_doc,
"paged_kv_last_page_len(seq_lens, page) -> numpy.ndarray | None\n\n"
"attnsync._fields.paged_kv_last_page_len: (seq_lens[r] - 1) % page + 1 for a row with context,\n"
"0 for an empty one (seq_lens int32 [R]), R int32 (read-only); None where seq_lens is not a\n"
"C-contiguous int32 array. Raises ValueError for a negative length.");

static PyObject *paged_kv_last_page_len(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    static const int32_arg specs[1] = {{0, 1}};
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "paged_kv_last_page_len(seq_lens, page)");
        return NULL;
    }
    long page = page_arg(args[1], "paged_kv_last_page_len");
    paging pages = paging_of(page);
    Py_buffer views[1];
    if (page < 0) return NULL;
    if (int32_buffers(args, specs, 1, views) != 0) Py_RETURN_NONE;
    Py_ssize_t rows = views[0].shape[0];
    int32_t *out = NULL;
    PyObject *made = new_int32s(rows, &out);
    if (made != NULL) {
        const int32_t *s = (const int32_t *)views[0].buf;
        for (Py_ssize_t r = 0; r < rows; r++) {
            if (s[r] < 0) {
                PyErr_Format(PyExc_ValueError, "paged_kv_last_page_len: row %zd has length %d", r, (int)s[r]);
                Py_CLEAR(made);
                break;
            }
            /* the tokens past the last page's start: (s - 1) % page + 1 */
            out[r] = s[r] ? (int32_t)(s[r] - column_of(pages, (int64_t)s[r] - 1) * pages.size) : 0;
        }
    }
    release_all(views, 1);
    return as_array(made);
}

PyDoc_STRVAR(paged_kv_indices_doc,
"paged_kv_indices(block_table, indptr) -> numpy.ndarray | None\n\n"
"attnsync._fields.paged_kv_indices: block_table[r, : indptr[r+1] - indptr[r]] for r = 0, 1, ...,\n"
"concatenated (int32 [R, W], int32 [R+1]), indptr[R] int32 (read-only); None where an input is not\n"
"a C-contiguous int32 array. Raises ValueError where indptr does not start at 0, decreases, or\n"
"gives a row more than W pages.");

static PyObject *paged_kv_indices(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    static const int32_arg specs[2] = {{0, 2}, {1, 1}};
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "paged_kv_indices(block_table, indptr)");
        return NULL;
    }
    Py_buffer views[2];
    if (int32_buffers(args, specs, 2, views) != 0) Py_RETURN_NONE;
    Py_ssize_t rows = views[0].shape[0], width = views[0].shape[1];
    const int32_t *t = (const int32_t *)views[0].buf, *offsets = (const int32_t *)views[1].buf;
    int32_t *out = NULL;
    PyObject *made = NULL;
    /* (the shape check comes first, so offsets[0] and offsets[rows] exist when read) */
    if (views[1].shape[0] != rows + 1 || offsets[0] != 0 || offsets[rows] < 0) {
        PyErr_SetString(PyExc_ValueError, "paged_kv_indices: indptr must have R+1 entries from 0");
    } else if ((made = new_int32s(offsets[rows], &out)) != NULL) {
        Py_ssize_t length = offsets[rows];
        for (Py_ssize_t r = 0; r < rows; r++) {
            int64_t start = offsets[r], pages = (int64_t)offsets[r + 1] - start;
            if (pages < 0 || pages > width || start + pages > length) {
                PyErr_Format(PyExc_ValueError, "paged_kv_indices: row %zd's pages [%lld, %lld) do not "
                             "fit its %zd columns and an output of %zd", r, (long long)start,
                             (long long)(start + pages), width, length);
                Py_CLEAR(made);
                break;
            }
            memcpy(out + start, t + r * width, (size_t)pages * sizeof(int32_t));
        }
    }
    release_all(views, 2);
    return as_array(made);
}

PyDoc_STRVAR(region_split_doc,
"region_split(query_lens, seq_lens, is_prefilling, threshold) -> (rows, tokens, decode_first) | None\n\n"
"The decode-first split of attnsync._fields.region_split in one pass: each row's region (0 decode:\n"
"query_len <= threshold and not prefilling; 1 short extend: <= threshold and prefilling; 2 long\n"
"extend: > threshold with context; 3 prefill: > threshold, seq_len <= query_len), then rows and\n"
"tokens per region as two 4-tuples of ints, and whether no decode row follows a non-decode\n"
"row. query_lens and seq_lens int32 [R]; is_prefilling bool [R] or None; threshold >= 1. None\n"
"where an input is not such a C-contiguous array.");

static PyObject *region_split(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    static const int32_arg specs[2] = {{0, 1}, {1, 1}};
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "region_split(query_lens, seq_lens, is_prefilling, threshold)");
        return NULL;
    }
    long threshold = PyLong_AsLong(args[3]);
    if (threshold == -1 && PyErr_Occurred()) return NULL;
    if (threshold < 1) {
        PyErr_SetString(PyExc_ValueError, "region_split: threshold must be >= 1");
        return NULL;
    }
    Py_buffer views[2], flags;
    if (int32_buffers(args, specs, 2, views) != 0) Py_RETURN_NONE;
    Py_ssize_t rows = views[0].shape[0];
    int have_flags = args[2] != Py_None;
    if (views[1].shape[0] != rows) {
        release_all(views, 2);
        Py_RETURN_NONE;
    }
    if (have_flags && !bool_buffer(args[2], &flags, rows)) {
        release_all(views, 2);
        Py_RETURN_NONE;
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

/* The block table's copy and its largest entry seen as uint32 (a negative page id is >= 2**31),
 * in one pass over the table: with AVX2 where the CPU has it (baseline x86-64 has no unsigned
 * 32-bit vector max, and a scalar loop is many times slower than numpy's runtime-dispatched
 * AVX2 maximum). Returns 1 with *best set, or 0 having only copied (the
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

static PyMethodDef methods[] = {
    {"check_batch", (PyCFunction)(void (*)(void))check_batch, METH_FASTCALL, check_batch_doc},
    {"pack", (PyCFunction)(void (*)(void))pack, METH_FASTCALL, pack_doc},
    {"slot_mapping", (PyCFunction)(void (*)(void))slot_mapping, METH_FASTCALL, slot_mapping_doc},
    {"token_to_req", (PyCFunction)(void (*)(void))token_to_req, METH_FASTCALL, token_to_req_doc},
    {"region_split", (PyCFunction)(void (*)(void))region_split, METH_FASTCALL, region_split_doc},
    {"paged_kv_indptr", (PyCFunction)(void (*)(void))paged_kv_indptr, METH_FASTCALL, paged_kv_indptr_doc},
    {"paged_kv_last_page_len", (PyCFunction)(void (*)(void))paged_kv_last_page_len, METH_FASTCALL,
     paged_kv_last_page_len_doc},
    {"paged_kv_indices", (PyCFunction)(void (*)(void))paged_kv_indices, METH_FASTCALL, paged_kv_indices_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "attnsync._native",
    "The compiled twin of attnsync's hot numpy steps (see attnsync/_accel.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

/* Bumped whenever a function is added or changes behaviour: attnsync/_accel.py ignores a module
 * built from an older source (a stale build in a checkout) instead of calling what it lacks. */
#define ATTNSYNC_NATIVE_VERSION 8

PyMODINIT_FUNC PyInit__native(void) {
    if (frombuffer == NULL) {
        PyObject *numpy = PyImport_ImportModule("numpy");
        if (numpy == NULL) return NULL;
        frombuffer = PyObject_GetAttrString(numpy, "frombuffer");
        int32_dtype = frombuffer == NULL ? NULL : PyObject_CallMethod(numpy, "dtype", "s", "int32");
        Py_DECREF(numpy);
        if (int32_dtype == NULL) {
            Py_CLEAR(frombuffer);
            return NULL;
        }
    }
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "VERSION", ATTNSYNC_NATIVE_VERSION) != 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
