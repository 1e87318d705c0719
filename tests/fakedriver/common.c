/*
 * tfgpud simulated NVIDIA driver: scenario parser (a strict TOML subset) and reload logic.
 */
#define _GNU_SOURCE
#include "common.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* Parser                                                                                      */
/* ------------------------------------------------------------------------------------------ */

enum { V_STR, V_INT, V_BOOL, V_ARRAY };

typedef struct {
    int type;
    int64_t i;
    bool b;
    char s[FD_STR];
    unsigned n;
    int64_t a[FD_MAX_ARRAY];
} value;

typedef struct {
    const char *p, *end;
    int line;
    char *err;
    size_t errlen;
    int *err_line;
} parser;

static bool fail(parser *ps, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool fail(parser *ps, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ps->err, ps->errlen, fmt, ap);
    va_end(ap);
    *ps->err_line = ps->line;
    return false;
}

static bool at_end(const parser *ps) { return ps->p >= ps->end; }
static int peek(const parser *ps) { return at_end(ps) ? -1 : (unsigned char)*ps->p; }
static int peek_at(const parser *ps, size_t k)
{
    return (size_t)(ps->end - ps->p) > k ? (unsigned char)ps->p[k] : -1;
}

static void skip_ws(parser *ps)
{
    while (!at_end(ps) && (*ps->p == ' ' || *ps->p == '\t'))
        ps->p++;
}

/* After a value or table header: whitespace, optional comment, then newline or EOF. */
static bool end_of_line(parser *ps)
{
    skip_ws(ps);
    if (peek(ps) == '#') {
        while (!at_end(ps) && *ps->p != '\n')
            ps->p++;
    }
    if (peek(ps) == '\r' && peek_at(ps, 1) == '\n')
        ps->p++;
    if (at_end(ps))
        return true;
    if (*ps->p != '\n')
        return fail(ps, "unexpected byte 0x%02X after value (one key = value per line)",
                    (unsigned char)*ps->p);
    ps->p++;
    ps->line++;
    return true;
}

/* Whitespace, newlines and comments (inside arrays). */
static void skip_ws_nl(parser *ps)
{
    for (;;) {
        skip_ws(ps);
        int c = peek(ps);
        if (c == '#') {
            while (!at_end(ps) && *ps->p != '\n')
                ps->p++;
        } else if (c == '\r' && peek_at(ps, 1) == '\n') {
            ps->p++;
        } else if (c == '\n') {
            ps->p++;
            ps->line++;
        } else {
            return;
        }
    }
}

static bool is_bare(int c) { return c >= 0 && (isalnum(c) || c == '_' || c == '-'); }

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static bool put_char(parser *ps, char *out, size_t *n, char c)
{
    if (*n + 1 >= FD_STR)
        return fail(ps, "string longer than %d bytes", FD_STR - 1);
    out[(*n)++] = c;
    return true;
}

static bool put_utf8(parser *ps, char *out, size_t *n, uint32_t cp)
{
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return fail(ps, "invalid unicode escape");
    if (cp == 0)
        return fail(ps, "NUL character in string");
    if (cp < 0x80)
        return put_char(ps, out, n, (char)cp);
    if (cp < 0x800)
        return put_char(ps, out, n, (char)(0xC0 | (cp >> 6))) &&
               put_char(ps, out, n, (char)(0x80 | (cp & 0x3F)));
    if (cp < 0x10000)
        return put_char(ps, out, n, (char)(0xE0 | (cp >> 12))) &&
               put_char(ps, out, n, (char)(0x80 | ((cp >> 6) & 0x3F))) &&
               put_char(ps, out, n, (char)(0x80 | (cp & 0x3F)));
    return put_char(ps, out, n, (char)(0xF0 | (cp >> 18))) &&
           put_char(ps, out, n, (char)(0x80 | ((cp >> 12) & 0x3F))) &&
           put_char(ps, out, n, (char)(0x80 | ((cp >> 6) & 0x3F))) &&
           put_char(ps, out, n, (char)(0x80 | (cp & 0x3F)));
}

static bool parse_string(parser *ps, value *v)
{
    char q = *ps->p;
    if (peek_at(ps, 1) == q && peek_at(ps, 2) == q)
        return fail(ps, "multi-line strings are not supported");
    ps->p++;
    size_t n = 0;
    for (;;) {
        int c = peek(ps);
        if (c < 0 || c == '\n')
            return fail(ps, "unterminated string");
        ps->p++;
        if (c == q)
            break;
        if ((c < 0x20 && c != '\t') || c == 0x7F)
            return fail(ps, "control character in string");
        if (c == '\\' && q == '"') {
            int e = peek(ps);
            if (e < 0)
                return fail(ps, "unterminated string");
            ps->p++;
            char out;
            switch (e) {
            case 'b': out = '\b'; break;
            case 't': out = '\t'; break;
            case 'n': out = '\n'; break;
            case 'f': out = '\f'; break;
            case 'r': out = '\r'; break;
            case '"': out = '"'; break;
            case '\\': out = '\\'; break;
            case 'u':
            case 'U': {
                int digits = e == 'u' ? 4 : 8;
                uint32_t cp = 0;
                for (int k = 0; k < digits; k++) {
                    int h = hexval(peek(ps));
                    if (h < 0)
                        return fail(ps, "invalid unicode escape");
                    cp = cp * 16 + (uint32_t)h;
                    ps->p++;
                }
                if (!put_utf8(ps, v->s, &n, cp))
                    return false;
                continue;
            }
            default:
                return fail(ps, "invalid escape '\\%c' in string", isprint(e) ? e : '?');
            }
            if (!put_char(ps, v->s, &n, out))
                return false;
            continue;
        }
        if (!put_char(ps, v->s, &n, (char)c))
            return false;
    }
    v->s[n] = '\0';
    v->type = V_STR;
    return true;
}

static bool parse_int(parser *ps, int64_t *out)
{
    int c = peek(ps);
    bool has_sign = c == '+' || c == '-';
    bool neg = c == '-';
    if (has_sign)
        ps->p++;
    /* the extent of the token, so that floats get a clear message */
    const char *q = ps->p;
    while (q < ps->end &&
           (isalnum((unsigned char)*q) || *q == '_' || *q == '.' ||
            ((*q == '+' || *q == '-') && q > ps->p && (q[-1] == 'e' || q[-1] == 'E'))))
        q++;
    int base = 10;
    if (q - ps->p >= 2 && ps->p[0] == '0' &&
        (ps->p[1] == 'x' || ps->p[1] == 'o' || ps->p[1] == 'b')) {
        if (has_sign)
            return fail(ps, "a sign is not allowed on hex/octal/binary integers");
        base = ps->p[1] == 'x' ? 16 : ps->p[1] == 'o' ? 8 : 2;
        ps->p += 2;
    } else {
        if ((q - ps->p == 3 && (memcmp(ps->p, "inf", 3) == 0 || memcmp(ps->p, "nan", 3) == 0)))
            return fail(ps, "floats are not supported");
        for (const char *r = ps->p; r < q; r++)
            if (*r == '.' || *r == 'e' || *r == 'E')
                return fail(ps, "floats are not supported");
    }
    uint64_t acc = 0;
    unsigned ndigits = 0;
    bool last_us = false;
    const char *start = ps->p;
    while (ps->p < q) {
        int ch = (unsigned char)*ps->p;
        if (ch == '_') {
            if (ndigits == 0 || last_us)
                return fail(ps, "misplaced '_' in integer");
            last_us = true;
            ps->p++;
            continue;
        }
        int d = hexval(ch);
        if (d < 0 || d >= base)
            return fail(ps, "invalid character 0x%02X in integer", (unsigned)ch);
        if (acc > (UINT64_MAX - (uint64_t)d) / (uint64_t)base)
            return fail(ps, "integer out of range");
        acc = acc * (uint64_t)base + (uint64_t)d;
        ndigits++;
        last_us = false;
        ps->p++;
    }
    if (ndigits == 0)
        return fail(ps, "expected digits");
    if (last_us)
        return fail(ps, "misplaced '_' in integer");
    if (base == 10 && *start == '0' && ndigits > 1)
        return fail(ps, "leading zeros are not allowed in integers");
    if (neg) {
        if (acc > (uint64_t)INT64_MAX + 1)
            return fail(ps, "integer out of range");
        *out = acc == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)acc;
    } else {
        if (acc > (uint64_t)INT64_MAX)
            return fail(ps, "integer out of range");
        *out = (int64_t)acc;
    }
    return true;
}

static bool word_is(const parser *ps, const char *w)
{
    size_t n = strlen(w);
    if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, w, n) != 0)
        return false;
    return !is_bare(peek_at(ps, n));
}

static bool parse_value(parser *ps, value *v)
{
    int c = peek(ps);
    if (c == '"' || c == '\'')
        return parse_string(ps, v);
    if (word_is(ps, "true") || word_is(ps, "false")) {
        v->type = V_BOOL;
        v->b = *ps->p == 't';
        ps->p += v->b ? 4 : 5;
        return true;
    }
    if (c == '[') {
        ps->p++;
        v->type = V_ARRAY;
        v->n = 0;
        for (;;) {
            skip_ws_nl(ps);
            c = peek(ps);
            if (c == ']') {
                ps->p++;
                return true;
            }
            if (c < 0)
                return fail(ps, "unterminated array");
            if (!(isdigit(c) || c == '+' || c == '-'))
                return fail(ps, "arrays may only contain integers");
            if (v->n >= FD_MAX_ARRAY)
                return fail(ps, "array longer than %d elements", FD_MAX_ARRAY);
            if (!parse_int(ps, &v->a[v->n]))
                return false;
            v->n++;
            skip_ws_nl(ps);
            c = peek(ps);
            if (c == ',') {
                ps->p++;
            } else if (c != ']') {
                return fail(ps, c < 0 ? "unterminated array" : "expected ',' or ']' in array");
            }
        }
    }
    if (c >= 0 && (isdigit(c) || c == '+' || c == '-')) {
        v->type = V_INT;
        return parse_int(ps, &v->i);
    }
    if (word_is(ps, "inf") || word_is(ps, "nan"))
        return fail(ps, "floats are not supported");
    if (c == '{')
        return fail(ps, "inline tables are not supported");
    if (c < 0 || c == '\n' || c == '\r' || c == '#')
        return fail(ps, "missing value");
    return fail(ps, "invalid value");
}

/* --- keys ----------------------------------------------------------------------------------- */

enum {
    T_STR,
    T_INT,  /* int64 within [min, max] */
    T_BOOL,
    T_ARRAY, /* of ints within [min, max] */
};

typedef struct {
    const char *name;
    int type;
    int64_t min, max;
} keyspec;

static const keyspec top_keys[] = {
    {"driver_version", T_STR, 0, 0},
    {"cuda_driver_version", T_INT, 0, INT32_MAX},
    {"nvml_version", T_STR, 0, 0},
    {"init_error", T_STR, 0, 0},
    {"cuda_init_error", T_INT, 0, INT32_MAX},
    {"cudart_version", T_INT, 0, INT32_MAX},
    {"cudnn_version", T_INT, 1, INT32_MAX},
};

static const keyspec gpu_keys[] = {
    {"name", T_STR, 0, 0},
    {"uuid", T_STR, 0, 0},
    {"pci_bus_id", T_STR, 0, 0},
    {"memory_total", T_INT, 0, INT64_MAX},
    {"memory_used", T_INT, 0, INT64_MAX},
    {"memory_reserved", T_INT, 0, INT64_MAX},
    {"utilization_gpu", T_INT, 0, 100},
    {"utilization_memory", T_INT, 0, 100},
    {"temperature", T_INT, 0, INT32_MAX},
    {"power_mw", T_INT, 0, UINT32_MAX},
    {"cc_major", T_INT, 0, 255},
    {"cc_minor", T_INT, 0, 255},
    {"process_pids", T_ARRAY, 0, UINT32_MAX},
    {"process_memory", T_ARRAY, 0, INT64_MAX},
    {"lost", T_BOOL, 0, 0},
    {"xids", T_ARRAY, 0, UINT32_MAX},
    {"ecc_uncorrected", T_INT, 0, INT64_MAX},
    {"persistence_mode", T_BOOL, 0, 0},
    {"mig_mode", T_BOOL, 0, 0},
};

/* indexes into gpu_keys */
enum { K_UUID = 1, K_PCI = 2, K_PIDS = 12, K_MEM = 13 };

#define NTOP (sizeof top_keys / sizeof top_keys[0])
#define NGPU (sizeof gpu_keys / sizeof gpu_keys[0])

static const char *type_name(int t)
{
    switch (t) {
    case T_STR: return "string";
    case T_INT: return "integer";
    case T_BOOL: return "boolean";
    default: return "array of integers";
    }
}

static bool check_type(parser *ps, const keyspec *k, const value *v)
{
    int want = k->type;
    int have = v->type == V_STR ? T_STR : v->type == V_INT ? T_INT : v->type == V_BOOL ? T_BOOL
                                                                                      : T_ARRAY;
    if (want != have)
        return fail(ps, "expected %s for key '%s'", type_name(want), k->name);
    if (want == T_INT && (v->i < k->min || v->i > k->max))
        return fail(ps, "value %" PRId64 " out of range [%" PRId64 ", %" PRId64 "] for key '%s'",
                    v->i, k->min, k->max, k->name);
    if (want == T_ARRAY)
        for (unsigned j = 0; j < v->n; j++)
            if (v->a[j] < k->min || v->a[j] > k->max)
                return fail(ps,
                            "element %" PRId64 " out of range [%" PRId64 ", %" PRId64
                            "] in '%s'",
                            v->a[j], k->min, k->max, k->name);
    return true;
}

static bool hexfield(const char **p, unsigned maxw, unsigned *out)
{
    unsigned v = 0, w = 0;
    while (hexval((unsigned char)**p) >= 0) {
        if (++w > maxw)
            return false;
        v = v * 16 + (unsigned)hexval((unsigned char)**p);
        (*p)++;
    }
    *out = v;
    return w > 0;
}

bool fd_parse_pci(const char *s, unsigned *domain, unsigned *bus, unsigned *device,
                  unsigned *function)
{
    const char *p = s;
    unsigned a, b, d, f;
    if (!hexfield(&p, 8, &a) || *p++ != ':' || !hexfield(&p, 8, &b))
        return false;
    if (*p == ':') {
        p++;
        if (!hexfield(&p, 2, &d))
            return false;
    } else {
        d = b;
        b = a;
        a = 0;
    }
    if (*p++ != '.' || !hexfield(&p, 1, &f) || *p != '\0')
        return false;
    if (b > 0xFF || d > 0x1F || f > 0x7)
        return false;
    *domain = a;
    *bus = b;
    *device = d;
    *function = f;
    return true;
}

static void uuid_to_bytes(const char *uuid, unsigned char out[16])
{
    const char *p = uuid;
    if (strncmp(p, "GPU-", 4) == 0 || strncmp(p, "MIG-", 4) == 0)
        p += 4;
    unsigned n = 0;
    unsigned char tmp[16];
    bool ok = true;
    for (; *p && ok; p++) {
        if (*p == '-')
            continue;
        int h1 = hexval((unsigned char)p[0]);
        int h2 = p[1] ? hexval((unsigned char)p[1]) : -1;
        if (h1 < 0 || h2 < 0 || n >= 16) {
            ok = false;
            break;
        }
        tmp[n++] = (unsigned char)(h1 * 16 + h2);
        p++;
    }
    if (ok && n == 16) {
        memcpy(out, tmp, 16);
        return;
    }
    /* not a canonical UUID: derive 16 stable bytes (FNV-1a) */
    uint64_t h = 1469598103934665603ULL;
    for (const char *q = uuid; *q; q++) {
        h ^= (unsigned char)*q;
        h *= 1099511628211ULL;
    }
    for (int i = 0; i < 16; i++) {
        if (i == 8)
            h = h * 1099511628211ULL ^ 0x5bd1e995ULL;
        out[i] = (unsigned char)(h >> (8 * (i % 8)));
    }
}

static void gpu_defaults(fd_gpu *g, unsigned index)
{
    memset(g, 0, sizeof *g);
    snprintf(g->name, sizeof g->name, "NVIDIA A100-SXM4-40GB");
    snprintf(g->uuid, sizeof g->uuid, "GPU-fa4e0000-0000-4000-8000-%012x", index);
    g->pci_domain = 0;
    g->pci_bus = index + 1;
    g->memory_total = 40ULL * 1024 * 1024 * 1024;
    g->temperature = 35;
    g->power_mw = 60000;
    g->cc_major = 8;
    g->cc_minor = 0;
}

typedef struct {
    int line[NGPU > NTOP ? NGPU : NTOP];
} seen_t;

static bool assign_top(parser *ps, fd_scenario *sc, unsigned k, const value *v)
{
    const char *name = top_keys[k].name;
    if (strcmp(name, "driver_version") == 0) {
        memcpy(sc->driver_version, v->s, sizeof v->s);
    } else if (strcmp(name, "nvml_version") == 0) {
        memcpy(sc->nvml_version, v->s, sizeof v->s);
    } else if (strcmp(name, "cuda_driver_version") == 0) {
        sc->cuda_driver_version = (int)v->i;
    } else if (strcmp(name, "cuda_init_error") == 0) {
        sc->cuda_init_error = (int)v->i;
    } else if (strcmp(name, "cudart_version") == 0) {
        sc->cudart_version = (int)v->i;
    } else if (strcmp(name, "cudnn_version") == 0) {
        sc->cudnn_version = (int)v->i;
    } else if (strcmp(name, "init_error") == 0) {
        static const char *names[] = {"DRIVER_NOT_LOADED", "LIB_RM_VERSION_MISMATCH",
                                      "NO_PERMISSION", "UNKNOWN"};
        for (int i = 0; i < 4; i++)
            if (strcmp(v->s, names[i]) == 0) {
                sc->init_error = FD_INIT_DRIVER_NOT_LOADED + i;
                return true;
            }
        return fail(ps,
                    "init_error must be one of DRIVER_NOT_LOADED, LIB_RM_VERSION_MISMATCH, "
                    "NO_PERMISSION, UNKNOWN");
    }
    return true;
}

static bool assign_gpu(parser *ps, fd_gpu *g, unsigned k, const value *v)
{
    const char *name = gpu_keys[k].name;
    if (strcmp(name, "name") == 0) {
        memcpy(g->name, v->s, sizeof v->s);
    } else if (strcmp(name, "uuid") == 0) {
        if (v->s[0] == '\0')
            return fail(ps, "uuid must not be empty");
        memcpy(g->uuid, v->s, sizeof v->s);
    } else if (strcmp(name, "pci_bus_id") == 0) {
        if (!fd_parse_pci(v->s, &g->pci_domain, &g->pci_bus, &g->pci_device, &g->pci_function))
            return fail(ps, "pci_bus_id '%.40s' is not of the form 00000000:BB:DD.F", v->s);
    } else if (strcmp(name, "memory_total") == 0) {
        g->memory_total = (uint64_t)v->i;
    } else if (strcmp(name, "memory_used") == 0) {
        g->memory_used = (uint64_t)v->i;
    } else if (strcmp(name, "memory_reserved") == 0) {
        g->memory_reserved = (uint64_t)v->i;
    } else if (strcmp(name, "utilization_gpu") == 0) {
        g->utilization_gpu = (unsigned)v->i;
    } else if (strcmp(name, "utilization_memory") == 0) {
        g->utilization_memory = (unsigned)v->i;
    } else if (strcmp(name, "temperature") == 0) {
        g->temperature = (unsigned)v->i;
    } else if (strcmp(name, "power_mw") == 0) {
        g->power_mw = (unsigned)v->i;
    } else if (strcmp(name, "cc_major") == 0) {
        g->cc_major = (int)v->i;
    } else if (strcmp(name, "cc_minor") == 0) {
        g->cc_minor = (int)v->i;
    } else if (strcmp(name, "process_pids") == 0) {
        for (unsigned j = 0; j < v->n; j++)
            g->process_pids[j] = (unsigned)v->a[j];
        g->nprocs = v->n;
    } else if (strcmp(name, "process_memory") == 0) {
        for (unsigned j = 0; j < v->n; j++)
            g->process_memory[j] = (uint64_t)v->a[j];
        /* length checked against process_pids once the table is complete */
        g->nprocs = g->nprocs > v->n ? g->nprocs : v->n;
    } else if (strcmp(name, "lost") == 0) {
        g->lost = v->b;
    } else if (strcmp(name, "xids") == 0) {
        for (unsigned j = 0; j < v->n; j++)
            g->xids[j] = (uint64_t)v->a[j];
        g->nxids = v->n;
    } else if (strcmp(name, "ecc_uncorrected") == 0) {
        g->ecc_uncorrected = (uint64_t)v->i;
    } else if (strcmp(name, "persistence_mode") == 0) {
        g->persistence_mode = v->b;
    } else if (strcmp(name, "mig_mode") == 0) {
        g->mig_mode = v->b;
    }
    return true;
}

/* A [[gpu]] table is complete: process_pids and process_memory must be parallel. */
static bool finish_gpu(parser *ps, fd_scenario *sc, const seen_t *seen, unsigned npids,
                       unsigned nmem, int gpu_line)
{
    if (sc->ngpus == 0)
        return true;
    if (npids != nmem) {
        int lp = seen->line[K_PIDS], lm = seen->line[K_MEM];
        ps->line = lp > lm ? lp : lm;
        if (!ps->line)
            ps->line = gpu_line;
        return fail(ps,
                    "process_pids has %u elements but process_memory has %u (they are "
                    "parallel arrays)",
                    npids, nmem);
    }
    sc->gpu[sc->ngpus - 1].nprocs = npids;
    return true;
}

bool fd_parse(const char *text, size_t len, fd_scenario *sc, int *err_line, char *err,
              size_t errlen)
{
    parser ps = {text, text + len, 1, err, errlen, err_line};
    memset(sc, 0, sizeof *sc);
    snprintf(sc->driver_version, sizeof sc->driver_version, "550.54.15");
    snprintf(sc->nvml_version, sizeof sc->nvml_version, "12.550.54.15");
    sc->cuda_driver_version = 12040;
    sc->cudart_version = 12050;
    err[0] = '\0';
    *err_line = 0;

    seen_t seen;
    memset(&seen, 0, sizeof seen);
    unsigned npids = 0, nmem = 0;
    bool in_gpu = false;
    int gpu_line = 0;
    static int uuid_line[FD_MAX_GPUS], pci_line[FD_MAX_GPUS];

    const char *nul = memchr(text, '\0', len);
    if (nul) {
        for (const char *q = text; q < nul; q++)
            ps.line += *q == '\n';
        return fail(&ps, "NUL byte in file");
    }


    for (;;) {
        skip_ws(&ps);
        int c = peek(&ps);
        if (c < 0)
            break;
        if (c == '\n' || c == '#' || (c == '\r' && peek_at(&ps, 1) == '\n')) {
            if (!end_of_line(&ps))
                return false;
            continue;
        }
        if (c == '[') {
            if (peek_at(&ps, 1) != '[')
                return fail(&ps, "only [[gpu]] tables are supported");
            int save_line = ps.line;
            ps.p += 2;
            skip_ws(&ps);
            const char *k0 = ps.p;
            while (is_bare(peek(&ps)))
                ps.p++;
            size_t kl = (size_t)(ps.p - k0);
            skip_ws(&ps);
            if (peek(&ps) != ']' || peek_at(&ps, 1) != ']')
                return fail(&ps, "malformed table header (expected [[gpu]])");
            if (kl != 3 || memcmp(k0, "gpu", 3) != 0)
                return fail(&ps, "unknown table '[[%.*s]]' (only [[gpu]] is supported)",
                            (int)(kl > 40 ? 40 : kl), k0);
            ps.p += 2;
            if (!finish_gpu(&ps, sc, &seen, npids, nmem, gpu_line))
                return false;
            if (sc->ngpus >= FD_MAX_GPUS)
                return fail(&ps, "more than %d [[gpu]] tables", FD_MAX_GPUS);
            gpu_defaults(&sc->gpu[sc->ngpus], sc->ngpus);
            sc->ngpus++;
            in_gpu = true;
            gpu_line = save_line;
            npids = nmem = 0;
            memset(&seen, 0, sizeof seen);
            uuid_line[sc->ngpus - 1] = pci_line[sc->ngpus - 1] = save_line;
            if (!end_of_line(&ps))
                return false;
            continue;
        }
        /* key = value */
        const char *k0 = ps.p;
        while (is_bare(peek(&ps)))
            ps.p++;
        size_t kl = (size_t)(ps.p - k0);
        if (kl == 0) {
            if (c == '"' || c == '\'')
                return fail(&ps, "quoted keys are not supported");
            return fail(&ps, "expected a key");
        }
        skip_ws(&ps);
        if (peek(&ps) == '.')
            return fail(&ps, "dotted keys are not supported");
        if (peek(&ps) != '=')
            return fail(&ps, "expected '=' after key '%.*s'", (int)(kl > 40 ? 40 : kl), k0);
        ps.p++;
        skip_ws(&ps);

        const keyspec *keys = in_gpu ? gpu_keys : top_keys;
        unsigned nkeys = in_gpu ? NGPU : NTOP;
        unsigned k;
        for (k = 0; k < nkeys; k++)
            if (strlen(keys[k].name) == kl && memcmp(keys[k].name, k0, kl) == 0)
                break;
        if (k == nkeys)
            return fail(&ps, "unknown key '%.*s'%s", (int)(kl > 40 ? 40 : kl), k0,
                        in_gpu ? " in [[gpu]]" : " at top level");
        if (seen.line[k])
            return fail(&ps, "duplicate key '%s' (first set on line %d)", keys[k].name,
                        seen.line[k]);
        int key_line = ps.line;
        static value v; /* large; callers hold the library lock */
        memset(&v, 0, sizeof v);
        if (!parse_value(&ps, &v))
            return false;
        int end_line = ps.line;
        ps.line = key_line;
        if (!check_type(&ps, &keys[k], &v))
            return false;
        if (in_gpu) {
            if (!assign_gpu(&ps, &sc->gpu[sc->ngpus - 1], k, &v))
                return false;
            if (strcmp(keys[k].name, "process_pids") == 0)
                npids = v.n;
            if (strcmp(keys[k].name, "process_memory") == 0)
                nmem = v.n;
            if (k == K_UUID)
                uuid_line[sc->ngpus - 1] = key_line;
            if (k == K_PCI)
                pci_line[sc->ngpus - 1] = key_line;
        } else if (!assign_top(&ps, sc, k, &v)) {
            return false;
        }
        seen.line[k] = key_line;
        ps.line = end_line;
        if (!end_of_line(&ps))
            return false;
    }
    if (!finish_gpu(&ps, sc, &seen, npids, nmem, gpu_line))
        return false;

    /* uuid and PCI bus id must identify one GPU each */
    for (unsigned i = 0; i < sc->ngpus; i++) {
        fd_gpu *g = &sc->gpu[i];
        snprintf(g->pci_bus_id, sizeof g->pci_bus_id, "%08X:%02X:%02X.%X", g->pci_domain,
                 g->pci_bus, g->pci_device, g->pci_function);
        uuid_to_bytes(g->uuid, g->uuid_bytes);
        for (unsigned j = 0; j < i; j++) {
            if (strcmp(sc->gpu[j].uuid, g->uuid) == 0) {
                ps.line = uuid_line[i];
                return fail(&ps, "uuid '%.40s' is already used by [[gpu]] #%u (line %d)",
                            g->uuid, j, uuid_line[j]);
            }
            if (strcmp(sc->gpu[j].pci_bus_id, g->pci_bus_id) == 0) {
                ps.line = pci_line[i];
                return fail(&ps, "pci_bus_id '%s' is already used by [[gpu]] #%u (line %d)",
                            g->pci_bus_id, j, pci_line[j]);
            }
        }
    }
    return true;
}

/* ------------------------------------------------------------------------------------------ */
/* Reload on change                                                                            */
/* ------------------------------------------------------------------------------------------ */

static pthread_mutex_t fd_mu = PTHREAD_MUTEX_INITIALIZER;
static fd_scenario fd_scen[2];
static int fd_cur = -1; /* index of the good scenario in fd_scen, -1 = none */
static char fd_errbuf[1200];
static bool fd_error_reported;
static unsigned long fd_gen;

static struct {
    int kind; /* 0 = nothing read yet, 1 = env unset, 2 = stat/open failed, 3 = file read */
    char path[1024];
    int err;
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtim;
} fd_id;

void fd_lock(void) { pthread_mutex_lock(&fd_mu); }
void fd_unlock(void) { pthread_mutex_unlock(&fd_mu); }
const char *fd_error(void) { return fd_errbuf; }
unsigned long fd_generation(void) { return fd_gen; }

void fd_report_error(void)
{
    if (fd_error_reported || fd_cur >= 0)
        return;
    fd_error_reported = true;
    fprintf(stderr, "%s\n", fd_errbuf);
    fflush(stderr);
}

static void set_bad(void)
{
    /* keep the report on one line whatever the file contained */
    for (char *c = fd_errbuf; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7F)
            *c = '?';
    fd_cur = -1;
    fd_gen++;
    fd_error_reported = false;
}

static void load(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        fd_id.kind = 2;
        fd_id.err = e;
        snprintf(fd_errbuf, sizeof fd_errbuf, "fakedriver: %s: cannot read scenario: %s", path,
                 strerror(e));
        set_bad();
        return;
    }
    fd_id.kind = 3;
    fd_id.dev = st.st_dev;
    fd_id.ino = st.st_ino;
    fd_id.size = st.st_size;
    fd_id.mtim = st.st_mtim;

    char *buf = malloc(FD_MAX_FILE + 1);
    size_t n = 0;
    int e = 0;
    if (!buf) {
        e = ENOMEM;
    } else {
        while (n <= FD_MAX_FILE) {
            ssize_t r = read(fd, buf + n, FD_MAX_FILE + 1 - n);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0) {
                e = errno;
                break;
            }
            if (r == 0)
                break;
            n += (size_t)r;
        }
    }
    close(fd);
    if (e) {
        snprintf(fd_errbuf, sizeof fd_errbuf, "fakedriver: %s: cannot read scenario: %s", path,
                 strerror(e));
        free(buf);
        set_bad();
        return;
    }
    if (n > FD_MAX_FILE) {
        snprintf(fd_errbuf, sizeof fd_errbuf, "fakedriver: %s: scenario larger than %d bytes",
                 path, FD_MAX_FILE);
        free(buf);
        set_bad();
        return;
    }
    int slot = fd_cur == 0 ? 1 : 0;
    int line = 0;
    char why[512];
    bool ok = fd_parse(buf, n, &fd_scen[slot], &line, why, sizeof why);
    free(buf);
    if (!ok) {
        if (line > 0)
            snprintf(fd_errbuf, sizeof fd_errbuf, "fakedriver: %s:%d: %s", path, line, why);
        else
            snprintf(fd_errbuf, sizeof fd_errbuf, "fakedriver: %s: %s", path, why);
        set_bad();
        return;
    }
    fd_cur = slot;
    fd_gen++;
    fd_errbuf[0] = '\0';
    fd_error_reported = false;
}

const fd_scenario *fd_refresh(void)
{
    const char *path = getenv("TFGPUD_FAKE_DRIVER");
    if (!path || !*path) {
        if (fd_id.kind != 1) {
            fd_id.kind = 1;
            fd_id.path[0] = '\0';
            snprintf(fd_errbuf, sizeof fd_errbuf,
                     "fakedriver: TFGPUD_FAKE_DRIVER is not set: no scenario to simulate");
            set_bad();
        }
        return NULL;
    }
    bool same_path = strncmp(fd_id.path, path, sizeof fd_id.path) == 0;
    if (!same_path)
        snprintf(fd_id.path, sizeof fd_id.path, "%s", path);
    struct stat st;
    if (stat(path, &st) != 0) {
        int e = errno;
        if (!same_path || fd_id.kind != 2 || fd_id.err != e) {
            fd_id.kind = 2;
            fd_id.err = e;
            snprintf(fd_errbuf, sizeof fd_errbuf, "fakedriver: %s: cannot read scenario: %s",
                     path, strerror(e));
            set_bad();
        }
        return NULL;
    }
    if (!same_path || fd_id.kind != 3 || st.st_dev != fd_id.dev || st.st_ino != fd_id.ino ||
        st.st_size != fd_id.size || st.st_mtim.tv_sec != fd_id.mtim.tv_sec ||
        st.st_mtim.tv_nsec != fd_id.mtim.tv_nsec)
        load(path);
    return fd_cur >= 0 ? &fd_scen[fd_cur] : NULL;
}

bool fd_tracing(void)
{
    const char *t = getenv("TFGPUD_FAKE_DRIVER_TRACE");
    return t && *t && strcmp(t, "0") != 0;
}

void fd_trace(const char *lib, const char *fn, long rc)
{
    if (fd_tracing()) {
        fprintf(stderr, "fakedriver: trace: %s: %s -> %ld\n", lib, fn, rc);
        fflush(stderr);
    }
}

bool fd_copy_str(char *dst, size_t dstlen, const char *src)
{
    size_t n = strlen(src);
    if (!dst || n + 1 > dstlen)
        return false;
    memcpy(dst, src, n + 1);
    return true;
}
