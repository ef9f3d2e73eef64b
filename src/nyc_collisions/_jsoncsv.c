/*
 * SODA JSON rows -> the landed CSV's rows, in one pass in native code.
 *
 * The Python path (`pages.parse_rows_fast`: Arrow's JSON reader, string kernels for `location`,
 * Arrow's CSV writer) is the reference; this module writes the same bytes for the pages it
 * accepts and declines (returns None) everything else, which then takes that path. It accepts
 * rows that are JSON objects whose values are strings or null, and, in a column of kind 1 (a
 * legacy `location`), an object whose members are `human_address`, `latitude` and `longitude`
 * with string values. It declines numbers, booleans, arrays, other objects, a field it was not
 * told of, a key given twice, a row without the id column, invalid UTF-8, a lone surrogate,
 * a control character in a `location` member and anything that is not JSON.
 *
 * Landed CSV: every non-null value quoted, `"` doubled, null left empty, rows ending in `\n`
 * (Arrow's CSV writer on string columns). A location becomes compact JSON with sorted keys
 * (`{"human_address":"..","latitude":"..","longitude":".."}`), members absent left out, then
 * quoted as any value.
 *
 * The work is done without the GIL, so several workers convert at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

enum { KIND_TEXT = 0, KIND_LOCATION = 1 };
enum { SLOT_NULL = 0, SLOT_RAW, SLOT_ESCAPED, SLOT_LOCATION };
enum { N_MEMBERS = 3 };

static const char *const MEMBERS[N_MEMBERS] = {"human_address", "latitude", "longitude"};
static const size_t MEMBER_LEN[N_MEMBERS] = {13, 8, 9};

typedef struct {
    const unsigned char *s; /* the string's bytes between its quotes (or the location's `{`) */
    size_t n;
    int kind;
    /* a location's members: spans and whether each holds escapes; n == 0 and s == NULL when absent */
    const unsigned char *ms[N_MEMBERS];
    size_t mn[N_MEMBERS];
    int mesc[N_MEMBERS];
} Slot;

typedef struct {
    const char *s;
    size_t n;
} Key;

typedef struct {
    unsigned char *p;
    size_t n, cap;
} Out;

/* Bytes that end a run of plain string content: the quote, the backslash, control characters
   and every non-ASCII byte (checked as UTF-8 on its own). */
static unsigned char SPECIAL[256];

static void init_tables(void) {
    for (int c = 0; c < 256; c++)
        SPECIAL[c] = (c == '"' || c == '\\' || c < 0x20 || c >= 0x80);
}

static int reserve(Out *o, size_t more) {
    if (o->n + more <= o->cap)
        return 0;
    size_t cap = o->cap ? o->cap : 1 << 16;
    while (cap < o->n + more)
        cap *= 2;
    unsigned char *p = realloc(o->p, cap);
    if (!p)
        return -1;
    o->p = p;
    o->cap = cap;
    return 0;
}

static inline const unsigned char *skip_ws(const unsigned char *p, const unsigned char *end) {
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
        p++;
    return p;
}

/* One UTF-8 sequence at p (a byte >= 0x80); its length, or 0 when it is not valid UTF-8. */
static size_t utf8_len(const unsigned char *p, const unsigned char *end) {
    unsigned char c = p[0];
    size_t n;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if ((size_t)(end - p) < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (p[i] & 0x3F);
    }
    if ((n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
        return 0;
    return n;
}

static int hex4(const unsigned char *p, uint32_t *out) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= c - '0';
        else if (c >= 'a' && c <= 'f')
            v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            v |= c - 'A' + 10;
        else
            return -1;
    }
    *out = v;
    return 0;
}

/* The first byte at or after p that ends a run of plain string content (see SPECIAL). */
static inline const unsigned char *skip_plain(const unsigned char *p, const unsigned char *end) {
#if defined(__SSE2__)
    const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\');
    const __m128i space = _mm_set1_epi8(0x20);
    while (end - p >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)p);
        /* as signed bytes, control characters and every byte >= 0x80 are below 0x20 */
        __m128i hit = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)),
                                   _mm_cmplt_epi8(v, space));
        int mask = _mm_movemask_epi8(hit);
        if (mask)
            return p + __builtin_ctz((unsigned)mask);
        p += 16;
    }
#endif
    while (p < end && !SPECIAL[*p])
        p++;
    return p;
}

/* Scans a JSON string whose opening quote is at p[-1]. Sets its content span and whether it
   holds escapes; returns the byte after the closing quote, or NULL when the string is not valid
   (a raw control character, a bad escape, invalid UTF-8, a lone surrogate, no closing quote). */
static const unsigned char *scan_string(const unsigned char *p, const unsigned char *end,
                                        const unsigned char **s, size_t *n, int *escaped) {
    const unsigned char *start = p;
    int esc = 0;
    for (;;) {
        p = skip_plain(p, end);
        if (p >= end)
            return NULL;
        unsigned char c = *p;
        if (c == '"')
            break;
        if (c == '\\') {
            esc = 1;
            if (end - p < 2)
                return NULL;
            unsigned char e = p[1];
            if (e == 'u') {
                uint32_t u, lo;
                if (end - p < 6 || hex4(p + 2, &u))
                    return NULL;
                p += 6;
                if (u >= 0xDC00 && u <= 0xDFFF)
                    return NULL;
                if (u >= 0xD800 && u <= 0xDBFF) {
                    if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || hex4(p + 2, &lo) || lo < 0xDC00 ||
                        lo > 0xDFFF)
                        return NULL;
                    p += 6;
                }
                continue;
            }
            if (!(e == '"' || e == '\\' || e == '/' || e == 'b' || e == 'f' || e == 'n' || e == 'r' ||
                  e == 't'))
                return NULL;
            p += 2;
            continue;
        }
        if (c < 0x20)
            return NULL;
        size_t k = utf8_len(p, end);
        if (!k)
            return NULL;
        p += k;
    }
    *s = start;
    *n = (size_t)(p - start);
    *escaped = esc;
    return p + 1;
}

static inline void put_utf8(Out *o, uint32_t cp) {
    unsigned char *q = o->p + o->n;
    if (cp < 0x80) {
        q[0] = (unsigned char)cp;
        o->n += 1;
    } else if (cp < 0x800) {
        q[0] = (unsigned char)(0xC0 | (cp >> 6));
        q[1] = (unsigned char)(0x80 | (cp & 0x3F));
        o->n += 2;
    } else if (cp < 0x10000) {
        q[0] = (unsigned char)(0xE0 | (cp >> 12));
        q[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        q[2] = (unsigned char)(0x80 | (cp & 0x3F));
        o->n += 3;
    } else {
        q[0] = (unsigned char)(0xF0 | (cp >> 18));
        q[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        q[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        q[3] = (unsigned char)(0x80 | (cp & 0x3F));
        o->n += 4;
    }
}

/* Writes a scanned string's value (already checked by scan_string) for a CSV cell: `"` doubled.
   With in_json, the value is first written as a JSON string's content (`"` and `\` escaped), as
   inside a location's text; a control character there returns -1 (the Python path decides). */
static int put_value(Out *o, const unsigned char *s, size_t n, int in_json) {
    const unsigned char *end = s + n;
    while (s < end) {
        const unsigned char *run = s;
        while (s < end && *s != '\\')
            s++;
        memcpy(o->p + o->n, run, (size_t)(s - run));
        o->n += (size_t)(s - run);
        if (s >= end)
            break;
        uint32_t cp;
        unsigned char e = s[1];
        if (e == 'u') {
            hex4(s + 2, &cp);
            s += 6;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                uint32_t lo;
                hex4(s + 2, &lo);
                s += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
        } else {
            s += 2;
            switch (e) {
            case 'b': cp = '\b'; break;
            case 'f': cp = '\f'; break;
            case 'n': cp = '\n'; break;
            case 'r': cp = '\r'; break;
            case 't': cp = '\t'; break;
            default: cp = e; break; /* " \ / */
            }
        }
        if (cp == '"') {
            memcpy(o->p + o->n, in_json ? "\\\"\"" : "\"\"", in_json ? 3 : 2);
            o->n += in_json ? 3 : 2;
        } else if (cp == '\\' && in_json) {
            memcpy(o->p + o->n, "\\\\", 2);
            o->n += 2;
        } else if (cp < 0x20 && in_json) {
            return -1;
        } else {
            put_utf8(o, cp);
        }
    }
    return 0;
}

static inline void put(Out *o, const char *s, size_t n) {
    memcpy(o->p + o->n, s, n);
    o->n += n;
}

/* A location's CSV cell: `"{""human_address"":""..."",...}"`, members in sorted order, absent
   ones left out. A member without escapes holds no `"`, `\` or control character (JSON allows
   none of them raw), so it is copied as is; one with escapes is decoded and escaped again as
   the Python path writes it (-1 for a control character: the Python path decides). */
static int put_location(Out *o, const Slot *slot) {
    put(o, "\"{", 2);
    int first = 1;
    for (int m = 0; m < N_MEMBERS; m++) {
        if (!slot->ms[m])
            continue;
        if (!first)
            put(o, ",", 1);
        first = 0;
        put(o, "\"\"", 2);
        put(o, MEMBERS[m], MEMBER_LEN[m]);
        put(o, "\"\":\"\"", 5);
        if (slot->mesc[m]) {
            if (put_value(o, slot->ms[m], slot->mn[m], 1))
                return -1;
        } else {
            put(o, (const char *)slot->ms[m], slot->mn[m]);
        }
        put(o, "\"\"", 2);
    }
    put(o, "}\"", 2);
    return 0;
}

/* Parses a location object whose `{` is at p[-1]; returns the byte after its `}`, or NULL. */
static const unsigned char *scan_location(const unsigned char *p, const unsigned char *end,
                                          Slot *slot) {
    for (int m = 0; m < N_MEMBERS; m++) {
        slot->ms[m] = NULL;
        slot->mn[m] = 0;
        slot->mesc[m] = 0;
    }
    p = skip_ws(p, end);
    if (p < end && *p == '}')
        return p + 1;
    for (;;) {
        if (p >= end || *p != '"')
            return NULL;
        const unsigned char *k;
        size_t kn;
        int kesc;
        p = scan_string(p + 1, end, &k, &kn, &kesc);
        if (!p || kesc)
            return NULL;
        int m = 0;
        while (m < N_MEMBERS && !(kn == MEMBER_LEN[m] && memcmp(k, MEMBERS[m], kn) == 0))
            m++;
        if (m == N_MEMBERS || slot->ms[m])
            return NULL;
        p = skip_ws(p, end);
        if (p >= end || *p != ':')
            return NULL;
        p = skip_ws(p + 1, end);
        if (p >= end || *p != '"')
            return NULL;
        p = scan_string(p + 1, end, &slot->ms[m], &slot->mn[m], &slot->mesc[m]);
        if (!p)
            return NULL;
        p = skip_ws(p, end);
        if (p >= end)
            return NULL;
        if (*p == '}')
            return p + 1;
        if (*p != ',')
            return NULL;
        p = skip_ws(p + 1, end);
    }
}

typedef struct {
    const Key *keys; /* the columns' JSON keys, then the keys to skip */
    size_t ncols, nkeys;
    const unsigned char *kinds;
    size_t id_index;
    Py_ssize_t updated_index; /* the column of `:updated_at`, or -1 */
} Spec;

/* The key's index in spec->keys, or -1. */
static Py_ssize_t find_key(const Spec *spec, const unsigned char *k, size_t kn) {
    for (size_t i = 0; i < spec->nkeys; i++)
        if (spec->keys[i].n == kn && memcmp(spec->keys[i].s, k, kn) == 0)
            return (Py_ssize_t)i;
    return -1;
}

/* Whether the raw string a (an) sorts after b (bn), byte by byte as Python compares them. */
static inline int sorts_after(const unsigned char *a, size_t an, const unsigned char *b, size_t bn) {
    int c = memcmp(a, b, an < bn ? an : bn);
    return c > 0 || (c == 0 && an > bn);
}

/* Converts the rows; 0 when done, 1 when declined, -1 when out of memory. The last row's id
   and the latest `:updated_at` of the rows are pointed into the input. */
static int convert_rows(const Spec *spec, const unsigned char *p, const unsigned char *end, Out *o,
                        Slot *slots, size_t *order, size_t *rows, Slot *last_id, Slot *latest) {
    size_t ncols = spec->ncols;
    *rows = 0;
    for (size_t i = 0; i < ncols + 64; i++)
        order[i] = i;
    p = skip_ws(p, end);
    while (p < end) {
        if (*p != '{')
            return 1;
        const unsigned char *row_start = p;
        for (size_t i = 0; i < ncols; i++)
            slots[i].kind = SLOT_NULL;
        p = skip_ws(p + 1, end);
        size_t nth = 0;
        unsigned char seen[256];
        if (spec->nkeys > sizeof seen)
            return 1;
        memset(seen, 0, spec->nkeys);
        if (p < end && *p == '}') {
            p++;
        } else {
            for (;;) {
                if (p >= end || *p != '"')
                    return 1;
                /* The key the previous row had at this place, compared in place; else the
                   key is scanned and looked up (the keys given hold no byte that JSON escapes). */
                size_t guess = nth < ncols + 64 ? order[nth] : 0;
                const Key *g = &spec->keys[guess < spec->nkeys ? guess : 0];
                const unsigned char *k;
                size_t kn;
                Py_ssize_t idx;
                if ((size_t)(end - p) > g->n + 1 && p[1 + g->n] == '"' &&
                    memcmp(p + 1, g->s, g->n) == 0) {
                    idx = g - spec->keys;
                    k = p + 1;
                    kn = g->n;
                    p += g->n + 2;
                } else {
                    int kesc;
                    p = scan_string(p + 1, end, &k, &kn, &kesc);
                    if (!p || kesc)
                        return 1;
                    idx = find_key(spec, k, kn);
                }
                int skip = 0;
                if (idx < 0) {
                    if (kn >= 2 && k[0] == ':' && k[1] == '@')
                        skip = 1; /* computed regions are not landed */
                    else
                        return 1;
                } else {
                    if (seen[idx])
                        return 1;
                    seen[idx] = 1;
                    if (nth < ncols + 64)
                        order[nth] = (size_t)idx;
                    skip = (size_t)idx >= ncols;
                }
                nth++;
                p = skip_ws(p, end);
                if (p >= end || *p != ':')
                    return 1;
                p = skip_ws(p + 1, end);
                if (p >= end)
                    return 1;
                Slot *slot = skip ? NULL : &slots[idx];
                if (*p == '"') {
                    const unsigned char *s;
                    size_t n;
                    int esc;
                    p = scan_string(p + 1, end, &s, &n, &esc);
                    if (!p)
                        return 1;
                    if (slot) {
                        if (spec->kinds[idx] != KIND_TEXT)
                            return 1;
                        slot->s = s;
                        slot->n = n;
                        slot->kind = esc ? SLOT_ESCAPED : SLOT_RAW;
                    }
                } else if (*p == 'n') {
                    if (end - p < 4 || memcmp(p, "null", 4) != 0)
                        return 1;
                    p += 4;
                } else if (*p == '{') {
                    if (!slot || spec->kinds[idx] != KIND_LOCATION)
                        return 1;
                    p = scan_location(p + 1, end, slot);
                    if (!p)
                        return 1;
                    slot->kind = SLOT_LOCATION;
                } else {
                    return 1;
                }
                p = skip_ws(p, end);
                if (p >= end)
                    return 1;
                if (*p == '}') {
                    p++;
                    break;
                }
                if (*p != ',')
                    return 1;
                p = skip_ws(p + 1, end);
            }
        }
        const Slot *id = &slots[spec->id_index];
        if (id->kind != SLOT_RAW)
            return 1; /* no id, or one with escapes: the Python path says which */
        if (spec->updated_index >= 0) {
            const Slot *u = &slots[spec->updated_index];
            if (u->kind == SLOT_ESCAPED)
                return 1; /* a timestamp with escapes: the Python path compares it decoded */
            if (u->kind == SLOT_RAW &&
                (!latest->s || sorts_after(u->s, u->n, latest->s, latest->n)))
                *latest = *u;
        }
        /* Each value byte becomes at most two (a `\"` becomes `\""` inside a location), plus
           quotes and commas for every column and the location's member names. */
        if (reserve(o, 2 * (size_t)(p - row_start) + 4 * ncols + 64 * N_MEMBERS + 16))
            return -1;
        for (size_t i = 0; i < ncols; i++) {
            const Slot *slot = &slots[i];
            if (i)
                o->p[o->n++] = ',';
            switch (slot->kind) {
            case SLOT_RAW:
                o->p[o->n++] = '"';
                put(o, (const char *)slot->s, slot->n);
                o->p[o->n++] = '"';
                break;
            case SLOT_ESCAPED:
                o->p[o->n++] = '"';
                put_value(o, slot->s, slot->n, 0);
                o->p[o->n++] = '"';
                break;
            case SLOT_LOCATION:
                if (put_location(o, slot))
                    return 1;
                break;
            default:
                break;
            }
        }
        o->p[o->n++] = '\n';
        *last_id = *id;
        (*rows)++;
        p = skip_ws(p, end);
        if (p >= end)
            break;
        if (*p != ',')
            return 1;
        p = skip_ws(p + 1, end);
        if (p >= end)
            return 1; /* a trailing comma */
    }
    return 0;
}

static int fill_keys(PyObject *seq, Key *keys, size_t at) {
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(seq, i);
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(item, &len);
        if (!s)
            return -1;
        keys[at + (size_t)i].s = s;
        keys[at + (size_t)i].n = (size_t)len;
    }
    return 0;
}

/* Whether every key can be compared with a row's raw bytes: none holds a byte JSON escapes. */
static int plain_keys(const Key *keys, size_t n) {
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < keys[i].n; j++) {
            unsigned char c = (unsigned char)keys[i].s[j];
            if (c == '"' || c == '\\' || c < 0x20)
                return 0;
        }
    return 1;
}

PyDoc_STRVAR(convert_doc,
             "convert(rows, fields, kinds, skip, id_index, updated_index, /)\n--\n\n"
             "SODA JSON rows (objects separated by commas, without the array's brackets) -> "
             "(landed CSV bytes, rows, last id, latest :updated_at or ''), or None when the rows "
             "need the Python path.\n\n"
             "fields: the columns' JSON keys in landed order; kinds: one byte per column, 0 text, "
             "1 legacy location; skip: keys whose string values are not landed; id_index: the "
             "column of `:id`; updated_index: the column of `:updated_at`, or -1.");

static PyObject *convert(PyObject *self, PyObject *args) {
    Py_buffer buf;
    PyObject *fields, *skip;
    const char *kinds;
    Py_ssize_t kinds_n, id_index, updated_index;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*O!y#O!nn", &buf, &PyTuple_Type, &fields, &kinds, &kinds_n,
                          &PyTuple_Type, &skip, &id_index, &updated_index))
        return NULL;
    PyObject *result = NULL;
    Key *keys = NULL;
    Slot *slots = NULL;
    size_t *order = NULL;
    Out out = {NULL, 0, 0};
    Py_ssize_t ncols = PyTuple_GET_SIZE(fields);
    Py_ssize_t nkeys = ncols + PyTuple_GET_SIZE(skip);
    if (kinds_n != ncols || id_index < 0 || id_index >= ncols || ncols == 0 ||
        updated_index < -1 || updated_index >= ncols) {
        PyErr_SetString(PyExc_ValueError,
                        "kinds must give one byte per field, id_index a field, updated_index a "
                        "field or -1");
        goto done;
    }
    keys = PyMem_Calloc((size_t)nkeys, sizeof *keys);
    slots = PyMem_Calloc((size_t)ncols, sizeof *slots);
    order = PyMem_Calloc((size_t)ncols + 64, sizeof *order);
    if (!keys || !slots || !order) {
        PyErr_NoMemory();
        goto done;
    }
    if (fill_keys(fields, keys, 0) || fill_keys(skip, keys, (size_t)ncols))
        goto done;
    if (!plain_keys(keys, (size_t)nkeys)) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Spec spec = {keys,     (size_t)ncols,      (size_t)nkeys, (const unsigned char *)kinds,
                 (size_t)id_index, updated_index};
    const unsigned char *data = buf.buf;
    size_t rows = 0;
    Slot last = {0}, latest = {0};
    int status;
    Py_BEGIN_ALLOW_THREADS;
    status = reserve(&out, (size_t)buf.len + (size_t)buf.len / 2 + 1024);
    if (!status)
        status = convert_rows(&spec, data, data + buf.len, &out, slots, order, &rows, &last, &latest);
    Py_END_ALLOW_THREADS;
    if (status < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (status > 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *text = PyBytes_FromStringAndSize((const char *)out.p, (Py_ssize_t)out.n);
    PyObject *last_id = rows ? PyUnicode_DecodeUTF8((const char *)last.s, (Py_ssize_t)last.n,
                                                    "strict")
                             : Py_NewRef(Py_None);
    PyObject *newest = latest.s ? PyUnicode_DecodeUTF8((const char *)latest.s,
                                                       (Py_ssize_t)latest.n, "strict")
                                : PyUnicode_FromStringAndSize("", 0);
    if (text && last_id && newest)
        result = Py_BuildValue("(NnNN)", text, (Py_ssize_t)rows, last_id, newest);
    else {
        Py_XDECREF(text);
        Py_XDECREF(last_id);
        Py_XDECREF(newest);
    }
done:
    free(out.p);
    PyMem_Free(keys);
    PyMem_Free(slots);
    PyMem_Free(order);
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"convert", convert, METH_VARARGS, convert_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "nyc_collisions._jsoncsv",
    "SODA JSON rows -> landed CSV rows in native code (see pages.JsonRowsToCsv).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__jsoncsv(void) {
    init_tables();
    return PyModule_Create(&module);
}
