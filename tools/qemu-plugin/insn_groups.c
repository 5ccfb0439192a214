/*
 * A qemu TCG plugin for tools/arm-insn-count: counts the guest instructions executed, in all
 * and inside groups of address ranges of the main binary (one group per kernel's functions).
 *
 * Arguments (qemu -plugin insn_groups.so,ranges=FILE,out=FILE):
 *   ranges  a text file: a line "group NAME" starts a group, then lines "START END" (hex
 *           link-time addresses of the binary, END exclusive) belong to it;
 *   out     where the counts go at exit, one "NAME COUNT" line per group and "total COUNT".
 *
 * Link-time addresses become run-time ones through the load bias: the text segment's start
 * (qemu_plugin_start_code) less its link-time start, passed as text=HEX.
 *
 * Only the few API entry points it uses are declared here (API version 1, qemu 7.x and 8.x).
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

typedef uint64_t qemu_plugin_id_t;
struct qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t, struct qemu_plugin_tb *);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t, void *);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t, qemu_plugin_vcpu_tb_trans_cb_t);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *, enum qemu_plugin_op,
                                              void *, uint64_t);
void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *, enum qemu_plugin_op,
                                                void *, uint64_t);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, qemu_plugin_udata_cb_t, void *);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *, size_t);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *);
uint64_t qemu_plugin_start_code(void);

EXPORT int qemu_plugin_version = 1;

#define MAX_GROUPS 16

struct range {
    uint64_t start, end;
    int group;
};

static struct range *ranges;
static size_t n_ranges;
static char *group_names[MAX_GROUPS];
static int n_groups;
static uint64_t counts[MAX_GROUPS];
static uint64_t total;
static uint64_t text;
static uint64_t bias;
static bool have_bias;
static const char *out_path;

static int by_start(const void *a, const void *b)
{
    const struct range *x = a, *y = b;
    return x->start < y->start ? -1 : x->start > y->start;
}

/* The group of a run-time address, or -1. */
static int group_of(uint64_t vaddr)
{
    size_t lo = 0, hi = n_ranges;
    if (vaddr < bias) {
        return -1;
    }
    vaddr -= bias;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (vaddr < ranges[mid].start) {
            hi = mid;
        } else if (vaddr >= ranges[mid].end) {
            lo = mid + 1;
        } else {
            return ranges[mid].group;
        }
    }
    return -1;
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    (void)id;
    /* The binary is loaded after the plugin is installed: the first translation knows where. */
    if (!have_bias) {
        bias = qemu_plugin_start_code() - text;
        have_bias = true;
    }
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &total, n);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        int g = group_of(qemu_plugin_insn_vaddr(insn));
        if (g >= 0) {
            qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64,
                                                       &counts[g], 1);
        }
    }
}

static void write_counts(qemu_plugin_id_t id, void *data)
{
    FILE *f = fopen(out_path, "w");
    (void)id;
    (void)data;
    if (!f) {
        perror(out_path);
        return;
    }
    for (int g = 0; g < n_groups; g++) {
        fprintf(f, "%s %" PRIu64 "\n", group_names[g], counts[g]);
    }
    fprintf(f, "total %" PRIu64 "\n", total);
    fclose(f);
}

static int read_ranges(const char *path)
{
    char line[512];
    size_t cap = 0;
    FILE *f = fopen(path, "r");
    if (!f) {
        perror(path);
        return -1;
    }
    while (fgets(line, sizeof line, f)) {
        char name[400];
        uint64_t start, end;
        if (sscanf(line, "group %399s", name) == 1) {
            if (n_groups == MAX_GROUPS) {
                fprintf(stderr, "insn_groups: more than %d groups in %s\n", MAX_GROUPS, path);
                fclose(f);
                return -1;
            }
            group_names[n_groups++] = strdup(name);
        } else if (sscanf(line, "%" SCNx64 " %" SCNx64, &start, &end) == 2 && n_groups > 0) {
            if (n_ranges == cap) {
                cap = cap ? cap * 2 : 256;
                ranges = realloc(ranges, cap * sizeof *ranges);
            }
            ranges[n_ranges++] = (struct range){start, end, n_groups - 1};
        }
    }
    fclose(f);
    qsort(ranges, n_ranges, sizeof *ranges, by_start);
    return 0;
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const struct qemu_info_t *info, int argc,
                               char **argv)
{
    const char *ranges_path = NULL;
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "ranges=", 7) == 0) {
            ranges_path = argv[i] + 7;
        } else if (strncmp(argv[i], "out=", 4) == 0) {
            out_path = argv[i] + 4;
        } else if (strncmp(argv[i], "text=", 5) == 0) {
            text = strtoull(argv[i] + 5, NULL, 16);
        } else {
            fprintf(stderr, "insn_groups: unknown argument %s\n", argv[i]);
            return -1;
        }
    }
    if (!ranges_path || !out_path) {
        fprintf(stderr, "insn_groups: needs ranges=FILE and out=FILE\n");
        return -1;
    }
    if (read_ranges(ranges_path) != 0) {
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, write_counts, NULL);
    return 0;
}
