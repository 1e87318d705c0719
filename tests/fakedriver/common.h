/*
 * tfgpud simulated NVIDIA driver: code shared by libnvidia-ml.so.1 and libcuda.so.1.
 *
 * The scenario (a TOML subset, see README.md) is named by $TFGPUD_FAKE_DRIVER. Every API call
 * takes the lock, stat()s the file and re-reads it when its identity (device, inode, size,
 * mtime with nanoseconds) changed. Nothing here is exported from the libraries.
 */
#ifndef TFGPUD_FAKEDRIVER_COMMON_H
#define TFGPUD_FAKEDRIVER_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define FD_EXPORT __attribute__((visibility("default")))

#define FD_MAX_GPUS 64
#define FD_MAX_ARRAY 128 /* process_pids, process_memory, xids */
#define FD_STR 96        /* NVML_DEVICE_NAME_V2_BUFFER_SIZE / UUID_V2 buffer size */
#define FD_MAX_FILE (1024 * 1024)

/* init_error values */
enum {
    FD_INIT_OK = 0,
    FD_INIT_DRIVER_NOT_LOADED,
    FD_INIT_LIB_RM_VERSION_MISMATCH,
    FD_INIT_NO_PERMISSION,
    FD_INIT_UNKNOWN,
};

typedef struct {
    char name[FD_STR];
    char uuid[FD_STR];
    char pci_bus_id[32]; /* normalised: %08X:%02X:%02X.%X */
    unsigned pci_domain, pci_bus, pci_device, pci_function;
    uint64_t memory_total, memory_used, memory_reserved;
    unsigned utilization_gpu, utilization_memory, temperature, power_mw;
    int cc_major, cc_minor;
    unsigned nprocs;
    unsigned process_pids[FD_MAX_ARRAY];
    uint64_t process_memory[FD_MAX_ARRAY];
    bool lost;
    unsigned nxids;
    uint64_t xids[FD_MAX_ARRAY];
    uint64_t ecc_uncorrected;
    bool persistence_mode, mig_mode;
    unsigned char uuid_bytes[16];
} fd_gpu;

typedef struct {
    char driver_version[FD_STR];
    char nvml_version[FD_STR];
    int cuda_driver_version;
    int init_error; /* FD_INIT_* */
    int cuda_init_error;
    int cudart_version;
    int cudnn_version; /* 0 = not in the scenario: each libcudnn variant has its own default */
    unsigned ngpus;
    fd_gpu gpu[FD_MAX_GPUS];
} fd_scenario;

/* Parse `len` bytes of TOML-subset text. On failure returns false and writes
 * "LINE: reason" style information: *err_line (1-based, 0 = no line) and err (reason). */
bool fd_parse(const char *text, size_t len, fd_scenario *out, int *err_line, char *err,
              size_t errlen);

/* Lock, then bring the scenario up to date. Returns the current scenario or NULL when it is
 * missing or malformed (fd_error() then says why). Always pair with fd_unlock(). */
void fd_lock(void);
void fd_unlock(void);
const fd_scenario *fd_refresh(void);
/* The one-line explanation of the current failure ("fakedriver: FILE:LINE: reason"). */
const char *fd_error(void);
/* Print fd_error() to stderr once per version of the scenario file. */
void fd_report_error(void);
/* Increments whenever a new version of the file was read (good or bad). */
unsigned long fd_generation(void);

/* $TFGPUD_FAKE_DRIVER_TRACE=1: one stderr line per API call. */
bool fd_tracing(void);
void fd_trace(const char *lib, const char *fn, long rc);

/* Copy a string into a caller's buffer; false when it does not fit (with its NUL). */
bool fd_copy_str(char *dst, size_t dstlen, const char *src);

/* Parse "DDDDDDDD:BB:DD.F" / "DDDD:BB:DD.F" / "BB:DD.F" (hex). */
bool fd_parse_pci(const char *s, unsigned *domain, unsigned *bus, unsigned *device,
                  unsigned *function);

#endif
