/*
 * tfgpud simulated NVIDIA driver: libnvidia-ml.so.1.
 *
 * Struct layouts and return codes follow nvml.h (as nvidia-ml-py's ctypes declarations expect).
 * Every exported call takes the library lock and re-reads the scenario when it changed.
 */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* --- nvml.h subset ------------------------------------------------------------------------- */

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18,
    NVML_ERROR_MEMORY = 20,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t; /* 24 bytes */

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t; /* 40 bytes */
#define nvmlMemory_v2 0x02000028u

typedef struct {
    char busId[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    unsigned int reserved0, reserved1, reserved2, reserved3;
} nvmlPciInfo_v1_t; /* 52 bytes: what the unversioned nvmlDeviceGetPciInfo fills */

typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t; /* 68 bytes */

typedef struct {
    unsigned int gpu, memory;
} nvmlUtilization_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
} nvmlProcessInfo_v1_t; /* 16 bytes */

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t; /* v2 and v3: 24 bytes */

typedef struct fd_handle *nvmlDevice_t;
typedef struct fd_evset *nvmlEventSet_t;

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t; /* 32 bytes */

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
} nvmlEventData_v1_t; /* what the legacy nvmlEventSetWait fills: 24 bytes */

_Static_assert(sizeof(nvmlMemory_t) == 24, "nvmlMemory_t");
_Static_assert(sizeof(nvmlMemory_v2_t) == 40, "nvmlMemory_v2_t");
_Static_assert(sizeof(nvmlPciInfo_t) == 68, "nvmlPciInfo_t");
_Static_assert(sizeof(nvmlProcessInfo_t) == 24, "nvmlProcessInfo_t");
_Static_assert(sizeof(nvmlProcessInfo_v1_t) == 16, "nvmlProcessInfo_v1_t");
_Static_assert(sizeof(nvmlEventData_t) == 32, "nvmlEventData_t");

#define nvmlEventTypeSingleBitEccError 0x1ULL
#define nvmlEventTypeDoubleBitEccError 0x2ULL
#define nvmlEventTypePState 0x4ULL
#define nvmlEventTypeXidCriticalError 0x8ULL
#define nvmlEventTypeClock 0x10ULL
#define FD_SUPPORTED_EVENTS                                                                  \
    (nvmlEventTypeSingleBitEccError | nvmlEventTypeDoubleBitEccError | nvmlEventTypePState | \
     nvmlEventTypeXidCriticalError | nvmlEventTypeClock)

#define FD_PCI_DEVICE_ID 0x20B010DEu    /* A100 */
#define FD_PCI_SUBSYSTEM_ID 0x134F10DEu

/* --- state ---------------------------------------------------------------------------------- */

#define FD_MAX_HANDLES 1024
#define FD_MAX_EVSETS 64
#define FD_MAX_REGS 128

/* One per GPU uuid ever seen: stable pointers, never freed. */
struct fd_handle {
    char uuid[FD_STR];
    unsigned xids_delivered; /* per process, not per event set */
};

struct fd_evset {
    bool used;
    unsigned nregs;
    struct {
        struct fd_handle *h;
        unsigned long long mask;
    } reg[FD_MAX_REGS];
};

static struct fd_handle handles[FD_MAX_HANDLES];
static unsigned nhandles;
static struct fd_evset evsets[FD_MAX_EVSETS];
static unsigned init_count;

static const char *const LIB = "nvml";

static int init_code(int e)
{
    switch (e) {
    case FD_INIT_DRIVER_NOT_LOADED: return NVML_ERROR_DRIVER_NOT_LOADED;
    case FD_INIT_LIB_RM_VERSION_MISMATCH: return NVML_ERROR_LIB_RM_VERSION_MISMATCH;
    case FD_INIT_NO_PERMISSION: return NVML_ERROR_NO_PERMISSION;
    case FD_INIT_UNKNOWN: return NVML_ERROR_UNKNOWN;
    default: return NVML_SUCCESS;
    }
}

static struct fd_handle *handle_for(const char *uuid)
{
    for (unsigned i = 0; i < nhandles; i++)
        if (strcmp(handles[i].uuid, uuid) == 0)
            return &handles[i];
    if (nhandles >= FD_MAX_HANDLES)
        return NULL;
    struct fd_handle *h = &handles[nhandles++];
    snprintf(h->uuid, sizeof h->uuid, "%s", uuid);
    h->xids_delivered = 0;
    return h;
}

static bool valid_handle(const struct fd_handle *h)
{
    uintptr_t p = (uintptr_t)h, b = (uintptr_t)handles;
    return p >= b && p < (uintptr_t)(handles + nhandles) &&
           (p - b) % sizeof(struct fd_handle) == 0;
}

static bool valid_evset(const struct fd_evset *s)
{
    uintptr_t p = (uintptr_t)s, b = (uintptr_t)evsets;
    return p >= b && p < (uintptr_t)(evsets + FD_MAX_EVSETS) &&
           (p - b) % sizeof(struct fd_evset) == 0 && s->used;
}

static const fd_gpu *gpu_of(const fd_scenario *sc, const struct fd_handle *h, unsigned *index)
{
    for (unsigned i = 0; i < sc->ngpus; i++)
        if (strcmp(sc->gpu[i].uuid, h->uuid) == 0) {
            if (index)
                *index = i;
            return &sc->gpu[i];
        }
    return NULL;
}

/* Lock, refresh and check the library state. On failure the lock is still held. */
static int begin(const fd_scenario **out)
{
    fd_lock();
    const fd_scenario *sc = fd_refresh();
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (!sc) {
        fd_report_error();
        return NVML_ERROR_UNKNOWN;
    }
    if (sc->init_error)
        return init_code(sc->init_error);
    *out = sc;
    return NVML_SUCCESS;
}

/* begin() plus: the handle must be ours, its GPU present and not lost. */
static int begin_dev(nvmlDevice_t h, const fd_gpu **g, unsigned *index)
{
    const fd_scenario *sc = NULL;
    int rc = begin(&sc);
    if (rc)
        return rc;
    if (!valid_handle(h))
        return NVML_ERROR_INVALID_ARGUMENT;
    *g = gpu_of(sc, h, index);
    if (!*g || (*g)->lost)
        return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

static int end(const char *fn, int rc)
{
    fd_unlock();
    fd_trace(LIB, fn, rc);
    return rc;
}

#define DEV_CALL(h)                                                                           \
    const fd_gpu *g = NULL;                                                                   \
    unsigned gindex = 0;                                                                      \
    int rc_ = begin_dev(h, &g, &gindex);                                                      \
    (void)gindex;                                                                             \
    if (rc_)                                                                                  \
        return end(__func__, rc_)

#define SYS_CALL()                                                                            \
    const fd_scenario *sc = NULL;                                                             \
    int rc_ = begin(&sc);                                                                     \
    if (rc_)                                                                                  \
        return end(__func__, rc_)

/* --- init / shutdown ------------------------------------------------------------------------ */

FD_EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    fd_lock();
    const fd_scenario *sc = fd_refresh();
    int rc;
    if (!sc) {
        fd_report_error();
        rc = NVML_ERROR_UNKNOWN;
    } else if (sc->init_error) {
        rc = init_code(sc->init_error);
    } else {
        init_count++;
        rc = NVML_SUCCESS;
    }
    return end(__func__, rc);
}

FD_EXPORT nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
FD_EXPORT nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

FD_EXPORT nvmlReturn_t nvmlShutdown(void)
{
    fd_lock();
    int rc = NVML_SUCCESS;
    if (init_count == 0)
        rc = NVML_ERROR_UNINITIALIZED;
    else
        init_count--;
    return end(__func__, rc);
}

FD_EXPORT const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 11: return "Interrupt Request Issue";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case 14: return "Corrupted infoROM";
    case 15: return "GPU is lost";
    case 16: return "GPU requires restart";
    case 17: return "The operating system has blocked the request.";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    case 19: return "In use by another client";
    case 20: return "Insufficient Memory";
    case 21: return "No data";
    case 22: return "The requested vgpu operation is not available on target device, because "
                    "ECC is enabled";
    case 23: return "Insufficient resources";
    case 24: return "Frequency not supported";
    case 25: return "Argument version mismatch";
    case 26: return "Deprecated";
    case 27: return "Not Ready";
    case 28: return "GPU not found";
    case 29: return "Invalid state";
    case 999: return "Unknown Error";
    default: return "Unknown Error";
    }
}

/* --- system --------------------------------------------------------------------------------- */

static int copy_out(char *buf, unsigned length, const char *s)
{
    if (!buf)
        return NVML_ERROR_INVALID_ARGUMENT;
    return fd_copy_str(buf, length, s) ? NVML_SUCCESS : NVML_ERROR_INSUFFICIENT_SIZE;
}

FD_EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    SYS_CALL();
    return end(__func__, copy_out(version, length, sc->driver_version));
}

FD_EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    SYS_CALL();
    return end(__func__, copy_out(version, length, sc->nvml_version));
}

FD_EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v)
{
    SYS_CALL();
    if (!v)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    *v = sc->cuda_driver_version;
    return end(__func__, NVML_SUCCESS);
}

FD_EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v)
{
    return nvmlSystemGetCudaDriverVersion(v);
}

FD_EXPORT nvmlReturn_t nvmlSystemGetProcessName(unsigned int pid, char *name, unsigned int length)
{
    SYS_CALL();
    (void)sc;
    if (!name || length == 0)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    char path[64], comm[256];
    snprintf(path, sizeof path, "/proc/%u/comm", pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return end(__func__, NVML_ERROR_NOT_FOUND);
    size_t n = fread(comm, 1, sizeof comm - 1, f);
    fclose(f);
    comm[n] = '\0';
    comm[strcspn(comm, "\n")] = '\0';
    return end(__func__, copy_out(name, length, comm));
}

/* --- enumeration ---------------------------------------------------------------------------- */

FD_EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
    SYS_CALL();
    if (!count)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    *count = sc->ngpus;
    return end(__func__, NVML_SUCCESS);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *count)
{
    return nvmlDeviceGetCount_v2(count);
}

static int give_handle(const fd_gpu *g, nvmlDevice_t *device)
{
    struct fd_handle *h = handle_for(g->uuid);
    if (!h)
        return NVML_ERROR_MEMORY;
    *device = h;
    return NVML_SUCCESS;
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    SYS_CALL();
    if (!device || index >= sc->ngpus)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    return end(__func__, give_handle(&sc->gpu[index], device));
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    SYS_CALL();
    if (!uuid || !device)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    for (unsigned i = 0; i < sc->ngpus; i++)
        if (strcmp(sc->gpu[i].uuid, uuid) == 0)
            return end(__func__, give_handle(&sc->gpu[i], device));
    return end(__func__, NVML_ERROR_NOT_FOUND);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pciBusId, nvmlDevice_t *device)
{
    SYS_CALL();
    unsigned d, b, dv, f;
    if (!pciBusId || !device)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    if (!fd_parse_pci(pciBusId, &d, &b, &dv, &f))
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    for (unsigned i = 0; i < sc->ngpus; i++) {
        const fd_gpu *g = &sc->gpu[i];
        if (g->pci_domain == d && g->pci_bus == b && g->pci_device == dv && g->pci_function == f)
            return end(__func__, give_handle(g, device));
    }
    return end(__func__, NVML_ERROR_NOT_FOUND);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId(const char *pciBusId, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByPciBusId_v2(pciBusId, device);
}

/* --- per device ----------------------------------------------------------------------------- */

FD_EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    DEV_CALL(device);
    if (!index)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    *index = gindex;
    return end(__func__, NVML_SUCCESS);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minor)
{
    DEV_CALL(device);
    if (!minor)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    *minor = gindex;
    return end(__func__, NVML_SUCCESS);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    DEV_CALL(device);
    return end(__func__, copy_out(name, length, g->name));
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    DEV_CALL(device);
    return end(__func__, copy_out(uuid, length, g->uuid));
}

static void fill_pci(const fd_gpu *g, nvmlPciInfo_t *pci)
{
    memset(pci, 0, sizeof *pci);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%04X:%02X:%02X.%X",
             g->pci_domain & 0xFFFF, g->pci_bus, g->pci_device, g->pci_function);
    memcpy(pci->busId, g->pci_bus_id, sizeof pci->busId);
    pci->domain = g->pci_domain;
    pci->bus = g->pci_bus;
    pci->device = g->pci_device;
    pci->pciDeviceId = FD_PCI_DEVICE_ID;
    pci->pciSubSystemId = FD_PCI_SUBSYSTEM_ID;
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    DEV_CALL(device);
    if (!pci)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    fill_pci(g, pci);
    return end(__func__, NVML_SUCCESS);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    return nvmlDeviceGetPciInfo_v3(device, pci);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetPciInfo(nvmlDevice_t device, nvmlPciInfo_v1_t *pci)
{
    DEV_CALL(device);
    if (!pci)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    nvmlPciInfo_t full;
    fill_pci(g, &full);
    memset(pci, 0, sizeof *pci);
    memcpy(pci->busId, full.busIdLegacy, sizeof pci->busId);
    pci->domain = full.domain;
    pci->bus = full.bus;
    pci->device = full.device;
    pci->pciDeviceId = full.pciDeviceId;
    pci->pciSubSystemId = full.pciSubSystemId;
    return end(__func__, NVML_SUCCESS);
}

static unsigned long long sub0(unsigned long long a, unsigned long long b)
{
    return a > b ? a - b : 0;
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    DEV_CALL(device);
    if (!memory)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    memory->total = g->memory_total;
    memory->used = g->memory_used;
    memory->free = sub0(g->memory_total, g->memory_used);
    return end(__func__, NVML_SUCCESS);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    DEV_CALL(device);
    if (!memory)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    if (memory->version != nvmlMemory_v2)
        return end(__func__, NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    memory->total = g->memory_total;
    memory->reserved = g->memory_reserved;
    memory->used = g->memory_used;
    memory->free = sub0(sub0(g->memory_total, g->memory_used), g->memory_reserved);
    return end(__func__, NVML_SUCCESS);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *u)
{
    DEV_CALL(device);
    if (!u)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    u->gpu = g->utilization_gpu;
    u->memory = g->utilization_memory;
    return end(__func__, NVML_SUCCESS);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor, unsigned int *temp)
{
    DEV_CALL(device);
    if (!temp || sensor != 0)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    *temp = g->temperature;
    return end(__func__, NVML_SUCCESS);
}

typedef struct {
    unsigned int version;
    unsigned int sensorType;
    int temperature;
} nvmlTemperature_v1_t;
#define nvmlTemperature_v1 0x0100000Cu

FD_EXPORT nvmlReturn_t nvmlDeviceGetTemperatureV(nvmlDevice_t device, nvmlTemperature_v1_t *t)
{
    DEV_CALL(device);
    if (!t)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    if (t->version != nvmlTemperature_v1)
        return end(__func__, NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    if (t->sensorType != 0)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    t->temperature = (int)g->temperature;
    return end(__func__, NVML_SUCCESS);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    DEV_CALL(device);
    if (!power)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    *power = g->power_mw;
    return end(__func__, NVML_SUCCESS);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major,
                                                          int *minor)
{
    DEV_CALL(device);
    if (!major || !minor)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    *major = g->cc_major;
    *minor = g->cc_minor;
    return end(__func__, NVML_SUCCESS);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetArchitecture(nvmlDevice_t device, unsigned int *arch)
{
    DEV_CALL(device);
    if (!arch)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    /* NVML_DEVICE_ARCH_*: KEPLER 2, MAXWELL 3, PASCAL 4, VOLTA 5, TURING 6, AMPERE 7, ADA 8,
     * HOPPER 9, BLACKWELL 10, UNKNOWN 0xffffffff */
    int m = g->cc_major, n = g->cc_minor;
    unsigned a = 0xffffffffu;
    if (m == 3) a = 2;
    else if (m == 5) a = 3;
    else if (m == 6) a = 4;
    else if (m == 7) a = n >= 5 ? 6 : 5;
    else if (m == 8) a = n >= 9 ? 8 : 7;
    else if (m == 9) a = 9;
    else if (m == 10 || m == 12) a = 10;
    *arch = a;
    return end(__func__, NVML_SUCCESS);
}

static int running_processes(const fd_gpu *g, unsigned int *count, void *infos, size_t stride)
{
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    unsigned n = g ? g->nprocs : 0;
    if (*count < n || (n > 0 && !infos)) {
        *count = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    *count = n;
    for (unsigned i = 0; i < n; i++) {
        char *p = (char *)infos + i * stride;
        if (stride == sizeof(nvmlProcessInfo_t)) {
            nvmlProcessInfo_t *pi = (nvmlProcessInfo_t *)p;
            pi->pid = g->process_pids[i];
            pi->usedGpuMemory = g->process_memory[i];
            pi->gpuInstanceId = 0xFFFFFFFFu;
            pi->computeInstanceId = 0xFFFFFFFFu;
        } else {
            nvmlProcessInfo_v1_t *pi = (nvmlProcessInfo_v1_t *)p;
            pi->pid = g->process_pids[i];
            pi->usedGpuMemory = g->process_memory[i];
        }
    }
    return NVML_SUCCESS;
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device,
                                                               unsigned int *count,
                                                               nvmlProcessInfo_t *infos)
{
    DEV_CALL(device);
    return end(__func__, running_processes(g, count, infos, sizeof *infos));
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device,
                                                               unsigned int *count,
                                                               nvmlProcessInfo_t *infos)
{
    DEV_CALL(device);
    return end(__func__, running_processes(g, count, infos, sizeof *infos));
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t device,
                                                            unsigned int *count,
                                                            nvmlProcessInfo_v1_t *infos)
{
    DEV_CALL(device);
    return end(__func__, running_processes(g, count, infos, sizeof *infos));
}

#define GRAPHICS(fn, type)                                                                    \
    FD_EXPORT nvmlReturn_t fn(nvmlDevice_t device, unsigned int *count, type *infos)          \
    {                                                                                         \
        DEV_CALL(device);                                                                     \
        (void)g;                                                                              \
        (void)infos;                                                                          \
        return end(__func__, running_processes(NULL, count, infos, sizeof(type)));            \
    }
GRAPHICS(nvmlDeviceGetGraphicsRunningProcesses_v3, nvmlProcessInfo_t)
GRAPHICS(nvmlDeviceGetGraphicsRunningProcesses_v2, nvmlProcessInfo_t)
GRAPHICS(nvmlDeviceGetGraphicsRunningProcesses, nvmlProcessInfo_v1_t)
GRAPHICS(nvmlDeviceGetMPSComputeRunningProcesses_v3, nvmlProcessInfo_t)
GRAPHICS(nvmlDeviceGetMPSComputeRunningProcesses_v2, nvmlProcessInfo_t)
GRAPHICS(nvmlDeviceGetMPSComputeRunningProcesses, nvmlProcessInfo_v1_t)

FD_EXPORT nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, int errorType,
                                                   int counterType,
                                                   unsigned long long *eccCounts)
{
    DEV_CALL(device);
    if (!eccCounts || errorType < 0 || errorType > 1 || counterType < 0 || counterType > 1)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    *eccCounts = errorType == 1 ? g->ecc_uncorrected : 0;
    return end(__func__, NVML_SUCCESS);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetPersistenceMode(nvmlDevice_t device, int *mode)
{
    DEV_CALL(device);
    if (!mode)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    *mode = g->persistence_mode ? 1 : 0;
    return end(__func__, NVML_SUCCESS);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current,
                                            unsigned int *pending)
{
    DEV_CALL(device);
    if (!current || !pending)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    *current = *pending = g->mig_mode ? 1 : 0;
    return end(__func__, NVML_SUCCESS);
}

FD_EXPORT nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMig)
{
    DEV_CALL(device);
    (void)g;
    if (!isMig)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    *isMig = 0;
    return end(__func__, NVML_SUCCESS);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetComputeMode(nvmlDevice_t device, int *mode)
{
    DEV_CALL(device);
    (void)g;
    if (!mode)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    *mode = 0; /* NVML_COMPUTEMODE_DEFAULT */
    return end(__func__, NVML_SUCCESS);
}

/* PCIe link: a Gen4 x16 slot (TensorFlow logs an error-level line when these fail). */
#define PCIE(fn, value)                                                                       \
    FD_EXPORT nvmlReturn_t fn(nvmlDevice_t device, unsigned int *out)                         \
    {                                                                                         \
        DEV_CALL(device);                                                                     \
        (void)g;                                                                              \
        if (!out)                                                                             \
            return end(__func__, NVML_ERROR_INVALID_ARGUMENT);                                \
        *out = value;                                                                         \
        return end(__func__, NVML_SUCCESS);                                                   \
    }
PCIE(nvmlDeviceGetCurrPcieLinkGeneration, 4)
PCIE(nvmlDeviceGetMaxPcieLinkGeneration, 4)
PCIE(nvmlDeviceGetGpuMaxPcieLinkGeneration, 4)
PCIE(nvmlDeviceGetCurrPcieLinkWidth, 16)
PCIE(nvmlDeviceGetMaxPcieLinkWidth, 16)

/* --- events --------------------------------------------------------------------------------- */

FD_EXPORT nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
    SYS_CALL();
    (void)sc;
    if (!set)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    for (unsigned i = 0; i < FD_MAX_EVSETS; i++)
        if (!evsets[i].used) {
            memset(&evsets[i], 0, sizeof evsets[i]);
            evsets[i].used = true;
            *set = &evsets[i];
            return end(__func__, NVML_SUCCESS);
        }
    return end(__func__, NVML_ERROR_MEMORY);
}

FD_EXPORT nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
    fd_lock();
    int rc = NVML_SUCCESS;
    if (init_count == 0)
        rc = NVML_ERROR_UNINITIALIZED;
    else if (!valid_evset(set))
        rc = NVML_ERROR_INVALID_ARGUMENT;
    else
        set->used = false;
    return end(__func__, rc);
}

FD_EXPORT nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device,
                                                        unsigned long long *eventTypes)
{
    DEV_CALL(device);
    (void)g;
    if (!eventTypes)
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    *eventTypes = FD_SUPPORTED_EVENTS;
    return end(__func__, NVML_SUCCESS);
}

FD_EXPORT nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes,
                                                nvmlEventSet_t set)
{
    DEV_CALL(device);
    (void)g;
    if (!valid_evset(set))
        return end(__func__, NVML_ERROR_INVALID_ARGUMENT);
    if (eventTypes & ~FD_SUPPORTED_EVENTS)
        return end(__func__, NVML_ERROR_NOT_SUPPORTED);
    for (unsigned i = 0; i < set->nregs; i++)
        if (set->reg[i].h == device) {
            set->reg[i].mask |= eventTypes;
            return end(__func__, NVML_SUCCESS);
        }
    if (set->nregs >= FD_MAX_REGS)
        return end(__func__, NVML_ERROR_MEMORY);
    set->reg[set->nregs].h = device;
    set->reg[set->nregs].mask = eventTypes;
    set->nregs++;
    return end(__func__, NVML_SUCCESS);
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * Waiting blocks like the real driver's. Nothing becomes due until the scenario file changes,
 * so a waiting thread sleeps until an entry of the file's name is written, renamed, replaced
 * or removed in its directory (inotify; also the target's directory when the path is a
 * symlink), or until its deadline: no wake-ups of its own, so that measurements of a client
 * measure the client. A safety re-check every FD_WAIT_RECHECK_MS catches what a watch cannot
 * see (a state change made by another thread of the process, a file system without inotify
 * events). With nothing watched (no inotify instance left, the directory gone) it re-checks
 * every FD_WAIT_POLL_MS.
 *
 * One inotify instance per process (closing one costs milliseconds of wall time). Of the
 * threads waiting, one (the leader) sleeps in poll() on it and is the only one to read it;
 * the others sleep on a condition variable. The leader counts each relevant change in `seq`
 * and wakes everyone; a waiter that read `seq` before its last look at the scenario and sees
 * it moved does not sleep, so no change is missed between looking and sleeping.
 */
#define FD_WAIT_RECHECK_MS 60000
#define FD_WAIT_POLL_MS 100
#define FD_WATCH_EVENTS                                                                       \
    (IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE | IN_ATTRIB |       \
     IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)

static pthread_mutex_t wait_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wait_cv;
static pthread_once_t wait_once = PTHREAD_ONCE_INIT;
static struct {
    pid_t pid; /* the process that owns fd (a forked child starts over) */
    int fd;    /* inotify instance, -1 = none */
    bool stale; /* re-target the watches before the next sleep */
    char path[PATH_MAX]; /* the scenario path the watches are for */
    unsigned n;
    struct {
        int wd;
        char name[NAME_MAX + 1];
    } w[2];
    bool leader;
    unsigned long seq;
} ws = {.fd = -1, .stale = true};

static void wait_init(void)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&wait_cv, &a);
    pthread_condattr_destroy(&a);
}

/* wait_mu held. Watch the directory of `path` for changes to its last component. */
static void watch_add(const char *path)
{
    const char *slash = strrchr(path, '/');
    const char *name = slash ? slash + 1 : path;
    size_t dlen = slash ? (size_t)(slash - path) : 0;
    char dir[PATH_MAX];
    if (ws.n >= 2 || !*name || strlen(name) > NAME_MAX || dlen >= sizeof dir)
        return;
    if (!slash)
        snprintf(dir, sizeof dir, ".");
    else if (dlen == 0)
        snprintf(dir, sizeof dir, "/");
    else
        snprintf(dir, sizeof dir, "%.*s", (int)dlen, path);
    int wd = inotify_add_watch(ws.fd, dir, FD_WATCH_EVENTS);
    if (wd < 0)
        return;
    ws.w[ws.n].wd = wd;
    snprintf(ws.w[ws.n].name, sizeof ws.w[ws.n].name, "%s", name);
    ws.n++;
}

/* wait_mu held. Point the watches at the scenario named now; true when they were (re)made,
 * i.e. a change before this moment may have gone unseen. */
static bool watch_update(void)
{
    const char *path = getenv("TFGPUD_FAKE_DRIVER");
    if (!path)
        path = "";
    if (ws.fd >= 0 && !ws.stale && ws.n > 0 && strcmp(path, ws.path) == 0)
        return false;
    if (ws.fd < 0) {
        ws.fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
        ws.n = 0;
        if (ws.fd < 0)
            return false;
    }
    for (unsigned i = 0; i < ws.n; i++)
        inotify_rm_watch(ws.fd, ws.w[i].wd);
    ws.n = 0;
    snprintf(ws.path, sizeof ws.path, "%s", path);
    ws.stale = false;
    if (*path) {
        watch_add(path);
        struct stat st;
        char target[PATH_MAX];
        if (lstat(path, &st) == 0 && S_ISLNK(st.st_mode) && realpath(path, target))
            watch_add(target);
    }
    return ws.n > 0;
}

/* Leader only: drain the queued events; true when one may concern the scenario file. */
static bool watch_read(int fd)
{
    bool relevant = false;
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    for (;;) {
        ssize_t len = read(fd, buf, sizeof buf);
        if (len < 0 && errno == EINTR)
            continue;
        if (len <= 0)
            return relevant;
        pthread_mutex_lock(&wait_mu);
        for (char *p = buf; p < buf + len;) {
            const struct inotify_event *ev = (const struct inotify_event *)p;
            if (ev->mask & IN_Q_OVERFLOW)
                relevant = true; /* events lost */
            for (unsigned i = 0; i < ws.n; i++) {
                if (ev->wd != ws.w[i].wd)
                    continue; /* e.g. the IN_IGNORED of a watch removed on re-targeting: a
                                 wake-up for it would re-target again, for ever */
                if (ev->mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF))
                    relevant = true; /* the directory itself went away */
                else if (ev->len && strcmp(ev->name, ws.w[i].name) == 0)
                    relevant = true;
            }
            p += sizeof *ev + ev->len;
        }
        pthread_mutex_unlock(&wait_mu);
    }
}

/* Leader only: sleep in poll() until a relevant event or `ms` passed. */
static bool watch_sleep(int fd, long long ms)
{
    long long until = now_ms() + ms;
    for (;;) {
        struct pollfd pfd = {fd, POLLIN, 0};
        int r = poll(&pfd, fd >= 0 ? 1 : 0, (int)ms);
        if (r > 0 && watch_read(fd))
            return true;
        ms = until - now_ms();
        if (r == 0 || ms <= 0 || (r < 0 && errno != EINTR))
            return false;
    }
}

static unsigned long wait_seq(void)
{
    pthread_mutex_lock(&wait_mu);
    unsigned long seq = ws.seq;
    pthread_mutex_unlock(&wait_mu);
    return seq;
}

/* Sleep until the scenario may have changed since `seen` was read, or `left` ms passed. */
static void wait_change(unsigned long seen, long long left)
{
    pthread_once(&wait_once, wait_init);
    pthread_mutex_lock(&wait_mu);
    pid_t pid = getpid();
    if (ws.pid != pid) {
        /* first wait, or a forked child: the instance and the leader are the parent's */
        if (ws.fd >= 0)
            close(ws.fd);
        ws.fd = -1;
        ws.pid = pid;
        ws.stale = true;
        ws.n = 0;
        ws.leader = false;
    }
    long long ms = ws.n > 0 ? FD_WAIT_RECHECK_MS : FD_WAIT_POLL_MS;
    if (left < ms)
        ms = left;
    if (ws.seq != seen) {
        pthread_mutex_unlock(&wait_mu);
        return;
    }
    if (!ws.leader) {
        ws.leader = true;
        bool retargeted = watch_update(), changed = false;
        int fd = ws.fd;
        if (ws.n == 0 && ms > FD_WAIT_POLL_MS)
            ms = FD_WAIT_POLL_MS; /* nothing is watched: no inotify, or no directory */
        pthread_mutex_unlock(&wait_mu);
        if (!retargeted)
            changed = watch_sleep(fd, ms);
        pthread_mutex_lock(&wait_mu);
        ws.leader = false;
        if (retargeted || changed)
            ws.seq++;
        if (changed)
            ws.stale = true; /* a symlink may point elsewhere now */
        pthread_cond_broadcast(&wait_cv); /* re-check, and one of you leads */
        pthread_mutex_unlock(&wait_mu);
        return;
    }
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    while (ws.seq == seen && ws.leader &&
           pthread_cond_timedwait(&wait_cv, &wait_mu, &ts) != ETIMEDOUT)
        ;
    pthread_mutex_unlock(&wait_mu);
}

static nvmlReturn_t event_wait(const char *fn, nvmlEventSet_t set, nvmlEventData_t *data,
                               unsigned int timeoutms)
{
    long long deadline = now_ms() + timeoutms;
    for (;;) {
        unsigned long seen = wait_seq();
        const fd_scenario *sc = NULL;
        int rc = begin(&sc);
        if (rc)
            return end(fn, rc);
        if (!valid_evset(set) || !data)
            return end(fn, NVML_ERROR_INVALID_ARGUMENT);
        for (unsigned i = 0; i < set->nregs; i++) {
            struct fd_handle *h = set->reg[i].h;
            if (!(set->reg[i].mask & nvmlEventTypeXidCriticalError))
                continue;
            const fd_gpu *g = gpu_of(sc, h, NULL);
            if (g && h->xids_delivered < g->nxids) {
                memset(data, 0, sizeof *data);
                data->device = h;
                data->eventType = nvmlEventTypeXidCriticalError;
                data->eventData = g->xids[h->xids_delivered++];
                data->gpuInstanceId = 0xFFFFFFFFu;
                data->computeInstanceId = 0xFFFFFFFFu;
                return end(fn, NVML_SUCCESS);
            }
        }
        fd_unlock();
        long long left = deadline - now_ms();
        if (left <= 0) {
            fd_trace(LIB, fn, NVML_ERROR_TIMEOUT);
            return NVML_ERROR_TIMEOUT;
        }
        wait_change(seen, left);
    }
}

FD_EXPORT nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data,
                                           unsigned int timeoutms)
{
    return event_wait(__func__, set, data, timeoutms);
}

FD_EXPORT nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_v1_t *data,
                                        unsigned int timeoutms)
{
    if (!data)
        return event_wait(__func__, set, NULL, timeoutms);
    nvmlEventData_t full;
    nvmlReturn_t rc = event_wait(__func__, set, &full, timeoutms);
    if (rc == NVML_SUCCESS) {
        data->device = full.device;
        data->eventType = full.eventType;
        data->eventData = full.eventData;
    }
    return rc;
}

/* --- everything else nvidia-ml-py can call: NOT_SUPPORTED ----------------------------------- */

static nvmlReturn_t not_supported(const char *fn)
{
    fd_lock();
    const fd_scenario *sc = fd_refresh();
    (void)sc;
    int rc = init_count == 0 ? NVML_ERROR_UNINITIALIZED : NVML_ERROR_NOT_SUPPORTED;
    return end(fn, rc);
}

#define FD_STUB(name)                                                                         \
    FD_EXPORT nvmlReturn_t name(void);                                                        \
    nvmlReturn_t name(void) { return not_supported(#name); }
#include "nvml_stubs.h"
#undef FD_STUB
