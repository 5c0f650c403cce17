/* edgekd's instruction counter: a QEMU TCG plugin (plugin API version 1, as in QEMU 7.2).

Counts the guest instructions executed between two marker system calls the measured program makes
(syscall number EDGEKD_MARKER_NR, arg0 = 1 to start a region, 2 to end it, arg1 = a tag), and writes
"<tag> <instructions>" per region to the file given as out=PATH. Counting is inline (no callback per
block), so it is cheap and exactly repeatable for the same binary, inputs and command line.

QEMU ships no header for this API in Debian, so the few declarations used are written out below; they
match include/qemu/qemu-plugin.h of QEMU 7.2. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EDGEKD_MARKER_NR 0x4544

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
typedef struct qemu_info_t qemu_info_t;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*syscall_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num, uint64_t a1,
                             uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7,
                             uint64_t a8);
typedef void (*udata_cb_t)(qemu_plugin_id_t id, void *userdata);

extern void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb_t cb);
extern void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op,
                                                     void *ptr, uint64_t imm);
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
extern void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, syscall_cb_t cb);
extern void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, udata_cb_t cb, void *userdata);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

static uint64_t executed;   /* every guest thread's instructions (the measured code runs one thread) */
static uint64_t region_start;
static FILE *out;

static void on_tb(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &executed,
                                             qemu_plugin_tb_n_insns(tb));
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8)
{
    if (num != EDGEKD_MARKER_NR)
        return;
    if (a1 == 1) {
        region_start = executed;
    } else if (a1 == 2 && out) {
        fprintf(out, "%llu %llu\n", (unsigned long long)a2, (unsigned long long)(executed - region_start));
        fflush(out);
    }
}

static void on_exit_cb(qemu_plugin_id_t id, void *p)
{
    if (out)
        fclose(out);
    out = NULL;
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    for (int i = 0; i < argc; i++)
        if (strncmp(argv[i], "out=", 4) == 0)
            out = fopen(argv[i] + 4, "w");
    if (!out) {
        fprintf(stderr, "edgekd insn_count plugin: needs out=PATH (a writable file)\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, on_exit_cb, NULL);
    return 0;
}
