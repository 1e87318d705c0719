/*
 * tfgpud simulated NVIDIA driver: libcuda.so.1 (the CUDA driver API as far as TensorFlow's
 * cuInit and device enumeration go). No contexts, memory or kernels: those calls fail with
 * CUDA_ERROR_NOT_SUPPORTED.
 */
#define _GNU_SOURCE
#include "common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef struct {
    char bytes[16];
} CUuuid;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_SYSTEM_DRIVER_MISMATCH = 803,
    CUDA_ERROR_UNKNOWN = 999,
};

static const char *const LIB = "cuda";
static bool cu_initialized;

static const struct {
    int code;
    const char *name, *text;
} cu_errors[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {4, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {5, "CUDA_ERROR_PROFILER_DISABLED", "profiler disabled while using external profiling tool"},
    {6, "CUDA_ERROR_PROFILER_NOT_INITIALIZED", "profiler not initialized: call cudaProfilerInitialize()"},
    {7, "CUDA_ERROR_PROFILER_ALREADY_STARTED", "profiler already started"},
    {8, "CUDA_ERROR_PROFILER_ALREADY_STOPPED", "profiler already stopped"},
    {34, "CUDA_ERROR_STUB_LIBRARY", "CUDA driver is a stub library"},
    {46, "CUDA_ERROR_DEVICE_UNAVAILABLE", "CUDA-capable device(s) is/are busy or unavailable"},
    {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {102, "CUDA_ERROR_DEVICE_NOT_LICENSED", "device doesn't have valid Grid license"},
    {200, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {202, "CUDA_ERROR_CONTEXT_ALREADY_CURRENT", "context already current"},
    {205, "CUDA_ERROR_MAP_FAILED", "mapping of buffer object failed"},
    {206, "CUDA_ERROR_UNMAP_FAILED", "unmapping of buffer object failed"},
    {207, "CUDA_ERROR_ARRAY_IS_MAPPED", "array is mapped"},
    {208, "CUDA_ERROR_ALREADY_MAPPED", "resource already mapped"},
    {209, "CUDA_ERROR_NO_BINARY_FOR_GPU", "no kernel image is available for execution on the device"},
    {210, "CUDA_ERROR_ALREADY_ACQUIRED", "resource already acquired"},
    {211, "CUDA_ERROR_NOT_MAPPED", "resource not mapped"},
    {212, "CUDA_ERROR_NOT_MAPPED_AS_ARRAY", "resource not mapped as array"},
    {213, "CUDA_ERROR_NOT_MAPPED_AS_POINTER", "resource not mapped as pointer"},
    {214, "CUDA_ERROR_ECC_UNCORRECTABLE", "uncorrectable ECC error encountered"},
    {215, "CUDA_ERROR_UNSUPPORTED_LIMIT", "limit is not supported on this architecture"},
    {216, "CUDA_ERROR_CONTEXT_ALREADY_IN_USE", "exclusive-thread device already in use by a different thread"},
    {217, "CUDA_ERROR_PEER_ACCESS_UNSUPPORTED", "peer access is not supported between these two devices"},
    {218, "CUDA_ERROR_INVALID_PTX", "a PTX JIT compilation failed"},
    {219, "CUDA_ERROR_INVALID_GRAPHICS_CONTEXT", "invalid OpenGL or DirectX context"},
    {220, "CUDA_ERROR_NVLINK_UNCORRECTABLE", "uncorrectable NVLink error detected during the execution"},
    {221, "CUDA_ERROR_JIT_COMPILER_NOT_FOUND", "PTX JIT compiler library not found"},
    {222, "CUDA_ERROR_UNSUPPORTED_PTX_VERSION", "the provided PTX was compiled with an unsupported toolchain."},
    {223, "CUDA_ERROR_JIT_COMPILATION_DISABLED", "PTX JIT compilation was disabled"},
    {300, "CUDA_ERROR_INVALID_SOURCE", "device kernel image is invalid"},
    {301, "CUDA_ERROR_FILE_NOT_FOUND", "file not found"},
    {302, "CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND", "shared object symbol not found"},
    {303, "CUDA_ERROR_SHARED_OBJECT_INIT_FAILED", "shared object initialization failed"},
    {304, "CUDA_ERROR_OPERATING_SYSTEM", "OS call failed or operation not supported on this OS"},
    {400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {401, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state"},
    {500, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {600, "CUDA_ERROR_NOT_READY", "device not ready"},
    {700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {701, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "too many resources requested for launch"},
    {702, "CUDA_ERROR_LAUNCH_TIMEOUT", "the launch timed out and was terminated"},
    {703, "CUDA_ERROR_LAUNCH_INCOMPATIBLE_TEXTURING", "launch uses incompatible texturing mode"},
    {704, "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED", "peer access is already enabled"},
    {705, "CUDA_ERROR_PEER_ACCESS_NOT_ENABLED", "peer access has not been enabled"},
    {708, "CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE", "cannot set while device is active in this process"},
    {709, "CUDA_ERROR_CONTEXT_IS_DESTROYED", "context is destroyed"},
    {710, "CUDA_ERROR_ASSERT", "device-side assert triggered"},
    {719, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {800, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"},
    {801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {802, "CUDA_ERROR_SYSTEM_NOT_READY", "system not yet initialized"},
    {803, "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH", "system has unsupported display driver / cuda driver combination"},
    {804, "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE", "forward compatibility was attempted on non supported HW"},
    {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

FD_EXPORT CUresult cuGetErrorName(CUresult error, const char **pStr)
{
    if (!pStr)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof cu_errors / sizeof cu_errors[0]; i++)
        if (cu_errors[i].code == error) {
            *pStr = cu_errors[i].name;
            return CUDA_SUCCESS;
        }
    *pStr = NULL;
    return CUDA_ERROR_INVALID_VALUE;
}

FD_EXPORT CUresult cuGetErrorString(CUresult error, const char **pStr)
{
    if (!pStr)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof cu_errors / sizeof cu_errors[0]; i++)
        if (cu_errors[i].code == error) {
            *pStr = cu_errors[i].text;
            return CUDA_SUCCESS;
        }
    *pStr = NULL;
    return CUDA_ERROR_INVALID_VALUE;
}

/* init_error (the NVML view of a broken driver) as cuInit reports it */
static int init_code(const fd_scenario *sc)
{
    if (sc->cuda_init_error)
        return sc->cuda_init_error;
    switch (sc->init_error) {
    case FD_INIT_DRIVER_NOT_LOADED: return CUDA_ERROR_NO_DEVICE;
    case FD_INIT_NO_PERMISSION: return CUDA_ERROR_NO_DEVICE;
    case FD_INIT_LIB_RM_VERSION_MISMATCH: return CUDA_ERROR_SYSTEM_DRIVER_MISMATCH;
    case FD_INIT_UNKNOWN: return CUDA_ERROR_UNKNOWN;
    default: return CUDA_SUCCESS;
    }
}

/* The GPUs CUDA shows, in ordinal order: CUDA_VISIBLE_DEVICES applied, lost GPUs left out. */
static unsigned visible(const fd_scenario *sc, unsigned out[FD_MAX_GPUS])
{
    unsigned n = 0;
    const char *env = getenv("CUDA_VISIBLE_DEVICES");
    if (!env) {
        for (unsigned i = 0; i < sc->ngpus; i++)
            if (!sc->gpu[i].lost)
                out[n++] = i;
        return n;
    }
    /* like libcuda: a comma-separated list of indexes or UUID prefixes; the first entry that
     * is invalid (e.g. -1) ends the list */
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", env);
    char *save = NULL;
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        while (*tok == ' ')
            tok++;
        size_t tl = strlen(tok);
        while (tl > 0 && tok[tl - 1] == ' ')
            tok[--tl] = '\0';
        int found = -1;
        if (tl > 0 && strspn(tok, "0123456789") == tl) {
            unsigned long v = strtoul(tok, NULL, 10);
            if (tl < 6 && v < sc->ngpus)
                found = (int)v;
        } else if (strncmp(tok, "GPU-", 4) == 0 && tl > 4) {
            for (unsigned i = 0; i < sc->ngpus; i++)
                if (strncmp(sc->gpu[i].uuid, tok, tl) == 0) {
                    if (found >= 0) {
                        found = -2; /* ambiguous prefix */
                        break;
                    }
                    found = (int)i;
                }
        }
        if (found < 0)
            break;
        bool dup = false;
        for (unsigned j = 0; j < n; j++)
            dup |= out[j] == (unsigned)found;
        if (dup)
            break;
        if (!sc->gpu[found].lost)
            out[n++] = (unsigned)found;
    }
    return n;
}

static int end(const char *fn, int rc)
{
    fd_unlock();
    fd_trace(LIB, fn, rc);
    return rc;
}

/* Lock and check: initialised, scenario readable, driver not broken. Lock held on return. */
static int begin(const fd_scenario **out)
{
    fd_lock();
    const fd_scenario *sc = fd_refresh();
    if (!cu_initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!sc) {
        fd_report_error();
        return CUDA_ERROR_UNKNOWN;
    }
    int rc = init_code(sc);
    if (rc)
        return rc;
    *out = sc;
    return CUDA_SUCCESS;
}

static int begin_dev(CUdevice dev, const fd_gpu **g)
{
    const fd_scenario *sc = NULL;
    int rc = begin(&sc);
    if (rc)
        return rc;
    unsigned idx[FD_MAX_GPUS];
    unsigned n = visible(sc, idx);
    if (dev < 0 || (unsigned)dev >= n)
        return CUDA_ERROR_INVALID_DEVICE;
    *g = &sc->gpu[idx[dev]];
    return CUDA_SUCCESS;
}

#define DEV_CALL(dev)                                                                         \
    const fd_gpu *g = NULL;                                                                   \
    int rc_ = begin_dev(dev, &g);                                                             \
    if (rc_)                                                                                  \
    return end(__func__, rc_)

FD_EXPORT CUresult cuInit(unsigned int flags)
{
    fd_lock();
    const fd_scenario *sc = fd_refresh();
    int rc;
    unsigned idx[FD_MAX_GPUS];
    if (flags != 0) {
        rc = CUDA_ERROR_INVALID_VALUE;
    } else if (!sc) {
        fd_report_error();
        rc = CUDA_ERROR_UNKNOWN;
    } else if ((rc = init_code(sc)) != 0) {
        ;
    } else if (visible(sc, idx) == 0) {
        rc = CUDA_ERROR_NO_DEVICE;
    } else {
        cu_initialized = true;
    }
    return end(__func__, rc);
}

FD_EXPORT CUresult cuDriverGetVersion(int *driverVersion)
{
    fd_lock();
    const fd_scenario *sc = fd_refresh();
    int rc = CUDA_SUCCESS;
    if (!driverVersion)
        rc = CUDA_ERROR_INVALID_VALUE;
    else if (!sc)
        rc = CUDA_ERROR_UNKNOWN;
    else
        *driverVersion = sc->cuda_driver_version;
    return end(__func__, rc);
}

FD_EXPORT CUresult cuDeviceGetCount(int *count)
{
    const fd_scenario *sc = NULL;
    int rc = begin(&sc);
    if (rc)
        return end(__func__, rc);
    if (!count)
        return end(__func__, CUDA_ERROR_INVALID_VALUE);
    unsigned idx[FD_MAX_GPUS];
    *count = (int)visible(sc, idx);
    return end(__func__, CUDA_SUCCESS);
}

FD_EXPORT CUresult cuDeviceGet(CUdevice *device, int ordinal)
{
    const fd_scenario *sc = NULL;
    int rc = begin(&sc);
    if (rc)
        return end(__func__, rc);
    if (!device)
        return end(__func__, CUDA_ERROR_INVALID_VALUE);
    unsigned idx[FD_MAX_GPUS];
    if (ordinal < 0 || (unsigned)ordinal >= visible(sc, idx))
        return end(__func__, CUDA_ERROR_INVALID_DEVICE);
    *device = ordinal;
    return end(__func__, CUDA_SUCCESS);
}

FD_EXPORT CUresult cuDeviceGetByPCIBusId(CUdevice *dev, const char *pciBusId)
{
    const fd_scenario *sc = NULL;
    int rc = begin(&sc);
    if (rc)
        return end(__func__, rc);
    unsigned d, b, dv, f;
    if (!dev || !pciBusId || !fd_parse_pci(pciBusId, &d, &b, &dv, &f))
        return end(__func__, CUDA_ERROR_INVALID_VALUE);
    unsigned idx[FD_MAX_GPUS];
    unsigned n = visible(sc, idx);
    for (unsigned i = 0; i < n; i++) {
        const fd_gpu *g = &sc->gpu[idx[i]];
        if (g->pci_domain == d && g->pci_bus == b && g->pci_device == dv && g->pci_function == f) {
            *dev = (int)i;
            return end(__func__, CUDA_SUCCESS);
        }
    }
    return end(__func__, CUDA_ERROR_INVALID_DEVICE);
}

FD_EXPORT CUresult cuDeviceGetName(char *name, int len, CUdevice dev)
{
    DEV_CALL(dev);
    if (!name || len <= 0)
        return end(__func__, CUDA_ERROR_INVALID_VALUE);
    snprintf(name, (size_t)len, "%s", g->name); /* truncates, like libcuda */
    return end(__func__, CUDA_SUCCESS);
}

FD_EXPORT CUresult cuDeviceGetPCIBusId(char *pciBusId, int len, CUdevice dev)
{
    DEV_CALL(dev);
    if (!pciBusId || len <= 0)
        return end(__func__, CUDA_ERROR_INVALID_VALUE);
    snprintf(pciBusId, (size_t)len, "%04X:%02X:%02X.%X", g->pci_domain & 0xFFFF, g->pci_bus,
             g->pci_device, g->pci_function);
    return end(__func__, CUDA_SUCCESS);
}

FD_EXPORT CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev)
{
    DEV_CALL(dev);
    if (!uuid)
        return end(__func__, CUDA_ERROR_INVALID_VALUE);
    memcpy(uuid->bytes, g->uuid_bytes, 16);
    return end(__func__, CUDA_SUCCESS);
}

FD_EXPORT CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev) { return cuDeviceGetUuid_v2(uuid, dev); }

FD_EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
    DEV_CALL(dev);
    if (!bytes)
        return end(__func__, CUDA_ERROR_INVALID_VALUE);
    *bytes = (size_t)g->memory_total;
    return end(__func__, CUDA_SUCCESS);
}

FD_EXPORT CUresult cuDeviceTotalMem(unsigned int *bytes, CUdevice dev)
{
    DEV_CALL(dev);
    if (!bytes)
        return end(__func__, CUDA_ERROR_INVALID_VALUE);
    *bytes = g->memory_total > 0xFFFFFFFFu ? 0xFFFFFFFFu : (unsigned)g->memory_total;
    return end(__func__, CUDA_SUCCESS);
}

FD_EXPORT CUresult cuDeviceComputeCapability(int *major, int *minor, CUdevice dev)
{
    DEV_CALL(dev);
    if (!major || !minor)
        return end(__func__, CUDA_ERROR_INVALID_VALUE);
    *major = g->cc_major;
    *minor = g->cc_minor;
    return end(__func__, CUDA_SUCCESS);
}

#define FD_CU_ATTRIBUTE_MAX 160

static int attribute(const fd_gpu *g, int a)
{
    switch (a) {
    case 1: return 1024;          /* MAX_THREADS_PER_BLOCK */
    case 2: return 1024;          /* MAX_BLOCK_DIM_X */
    case 3: return 1024;          /* MAX_BLOCK_DIM_Y */
    case 4: return 64;            /* MAX_BLOCK_DIM_Z */
    case 5: return 2147483647;    /* MAX_GRID_DIM_X */
    case 6: return 65535;         /* MAX_GRID_DIM_Y */
    case 7: return 65535;         /* MAX_GRID_DIM_Z */
    case 8: return 49152;         /* MAX_SHARED_MEMORY_PER_BLOCK */
    case 9: return 65536;         /* TOTAL_CONSTANT_MEMORY */
    case 10: return 32;           /* WARP_SIZE */
    case 11: return 2147483647;   /* MAX_PITCH */
    case 12: return 65536;        /* MAX_REGISTERS_PER_BLOCK */
    case 13: return 1410000;      /* CLOCK_RATE kHz */
    case 14: return 512;          /* TEXTURE_ALIGNMENT */
    case 15: return 1;            /* GPU_OVERLAP */
    case 16: return 108;          /* MULTIPROCESSOR_COUNT */
    case 17: return 0;            /* KERNEL_EXEC_TIMEOUT */
    case 18: return 0;            /* INTEGRATED */
    case 19: return 1;            /* CAN_MAP_HOST_MEMORY */
    case 20: return 0;            /* COMPUTE_MODE: default */
    case 30: return 512;          /* SURFACE_ALIGNMENT */
    case 31: return 1;            /* CONCURRENT_KERNELS */
    case 32: return 1;            /* ECC_ENABLED */
    case 33: return (int)g->pci_bus;
    case 34: return (int)g->pci_device;
    case 35: return 0;            /* TCC_DRIVER */
    case 36: return 1215000;      /* MEMORY_CLOCK_RATE kHz */
    case 37: return 5120;         /* GLOBAL_MEMORY_BUS_WIDTH */
    case 38: return 41943040;     /* L2_CACHE_SIZE */
    case 39: return 2048;         /* MAX_THREADS_PER_MULTIPROCESSOR */
    case 40: return 3;            /* ASYNC_ENGINE_COUNT */
    case 41: return 1;            /* UNIFIED_ADDRESSING */
    case 50: return (int)g->pci_domain;
    case 51: return 32;           /* TEXTURE_PITCH_ALIGNMENT */
    case 75: return g->cc_major;  /* COMPUTE_CAPABILITY_MAJOR */
    case 76: return g->cc_minor;  /* COMPUTE_CAPABILITY_MINOR */
    case 78: return 1;            /* STREAM_PRIORITIES_SUPPORTED */
    case 79: return 1;            /* GLOBAL_L1_CACHE_SUPPORTED */
    case 80: return 1;            /* LOCAL_L1_CACHE_SUPPORTED */
    case 81: return 167936;       /* MAX_SHARED_MEMORY_PER_MULTIPROCESSOR */
    case 82: return 65536;        /* MAX_REGISTERS_PER_MULTIPROCESSOR */
    case 83: return 1;            /* MANAGED_MEMORY */
    case 84: return 0;            /* MULTI_GPU_BOARD */
    case 86: return 0;            /* HOST_NATIVE_ATOMIC_SUPPORTED */
    case 87: return 2;            /* SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO */
    case 88: return 0;            /* PAGEABLE_MEMORY_ACCESS */
    case 89: return 1;            /* CONCURRENT_MANAGED_ACCESS */
    case 90: return 1;            /* COMPUTE_PREEMPTION_SUPPORTED */
    case 95: return 1;            /* COOPERATIVE_LAUNCH */
    case 97: return 166912;       /* MAX_SHARED_MEMORY_PER_BLOCK_OPTIN */
    case 106: return 32;          /* MAX_BLOCKS_PER_MULTIPROCESSOR */
    default: return 0;
    }
}

FD_EXPORT CUresult cuDeviceGetAttribute(int *pi, int attrib, CUdevice dev)
{
    DEV_CALL(dev);
    if (!pi || attrib <= 0 || attrib >= FD_CU_ATTRIBUTE_MAX)
        return end(__func__, CUDA_ERROR_INVALID_VALUE);
    *pi = attribute(g, attrib);
    return end(__func__, CUDA_SUCCESS);
}

FD_EXPORT CUresult cuDeviceCanAccessPeer(int *canAccessPeer, CUdevice dev, CUdevice peerDev)
{
    DEV_CALL(dev);
    (void)g;
    const fd_gpu *peer = NULL;
    fd_unlock();
    int rc = begin_dev(peerDev, &peer);
    if (rc)
        return end(__func__, rc);
    if (!canAccessPeer)
        return end(__func__, CUDA_ERROR_INVALID_VALUE);
    *canAccessPeer = 0;
    return end(__func__, CUDA_SUCCESS);
}

FD_EXPORT CUresult cuDevicePrimaryCtxGetState(CUdevice dev, unsigned int *flags, int *active)
{
    DEV_CALL(dev);
    (void)g;
    if (!flags || !active)
        return end(__func__, CUDA_ERROR_INVALID_VALUE);
    *flags = 0;
    *active = 0;
    return end(__func__, CUDA_SUCCESS);
}

FD_EXPORT CUresult cuCtxGetCurrent(CUcontext *pctx)
{
    const fd_scenario *sc = NULL;
    int rc = begin(&sc);
    if (rc)
        return end(__func__, rc);
    if (!pctx)
        return end(__func__, CUDA_ERROR_INVALID_VALUE);
    *pctx = NULL;
    return end(__func__, CUDA_SUCCESS);
}

FD_EXPORT CUresult cuCtxSetCurrent(CUcontext ctx)
{
    const fd_scenario *sc = NULL;
    int rc = begin(&sc);
    if (rc)
        return end(__func__, rc);
    return end(__func__, ctx ? CUDA_ERROR_INVALID_CONTEXT : CUDA_SUCCESS);
}

/* Calls that always fail the same way (after the scenario checks): `code` once it loaded. */
#define FIXED_ERROR(name, code)                                                               \
    FD_EXPORT CUresult name(void);                                                            \
    CUresult name(void)                                                                       \
    {                                                                                         \
        const fd_scenario *sc = NULL;                                                         \
        int rc = begin(&sc);                                                                  \
        return end(#name, rc ? rc : (code));                                                  \
    }
/* Everything needing a context: no context ever exists. */
#define NO_CONTEXT(name) FIXED_ERROR(name, CUDA_ERROR_INVALID_CONTEXT)
NO_CONTEXT(cuCtxGetDevice)
NO_CONTEXT(cuCtxSynchronize)
NO_CONTEXT(cuCtxGetApiVersion)
NO_CONTEXT(cuCtxGetFlags)
NO_CONTEXT(cuCtxPopCurrent)
NO_CONTEXT(cuCtxPopCurrent_v2)
NO_CONTEXT(cuMemGetInfo)
NO_CONTEXT(cuMemGetInfo_v2)

/* Creating contexts or touching device memory is beyond the simulation. */
#define UNSUPPORTED(name) FIXED_ERROR(name, CUDA_ERROR_NOT_SUPPORTED)
UNSUPPORTED(cuDevicePrimaryCtxRetain)
UNSUPPORTED(cuDevicePrimaryCtxRelease)
UNSUPPORTED(cuDevicePrimaryCtxRelease_v2)
UNSUPPORTED(cuDevicePrimaryCtxReset)
UNSUPPORTED(cuDevicePrimaryCtxReset_v2)
UNSUPPORTED(cuDevicePrimaryCtxSetFlags)
UNSUPPORTED(cuDevicePrimaryCtxSetFlags_v2)
UNSUPPORTED(cuCtxCreate)
UNSUPPORTED(cuCtxCreate_v2)
UNSUPPORTED(cuCtxCreate_v3)
UNSUPPORTED(cuCtxDestroy)
UNSUPPORTED(cuCtxDestroy_v2)
UNSUPPORTED(cuCtxPushCurrent)
UNSUPPORTED(cuCtxPushCurrent_v2)
UNSUPPORTED(cuDeviceGetLuid)
UNSUPPORTED(cuDeviceGetP2PAttribute)
UNSUPPORTED(cuMemAlloc)
UNSUPPORTED(cuMemAlloc_v2)
UNSUPPORTED(cuMemFree)
UNSUPPORTED(cuMemFree_v2)
UNSUPPORTED(cuMemHostAlloc)
UNSUPPORTED(cuMemFreeHost)
UNSUPPORTED(cuModuleLoadData)
UNSUPPORTED(cuModuleLoadDataEx)
UNSUPPORTED(cuStreamCreate)
UNSUPPORTED(cuStreamCreateWithPriority)

FD_EXPORT CUresult cuGetExportTable(const void **ppExportTable, const CUuuid *pExportTableId)
{
    (void)pExportTableId;
    if (ppExportTable)
        *ppExportTable = NULL;
    fd_trace(LIB, __func__, CUDA_ERROR_NOT_SUPPORTED);
    return CUDA_ERROR_NOT_SUPPORTED;
}

/* --- cuGetProcAddress ----------------------------------------------------------------------- */

FD_EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion,
                          unsigned long long flags);

static const struct {
    const char *name;
    void *fn;
} cu_symbols[] = {
#define SYM(n) {#n, (void *)n}
    SYM(cuInit),
    SYM(cuDriverGetVersion),
    SYM(cuGetErrorName),
    SYM(cuGetErrorString),
    SYM(cuDeviceGetCount),
    SYM(cuDeviceGet),
    SYM(cuDeviceGetByPCIBusId),
    SYM(cuDeviceGetName),
    SYM(cuDeviceGetPCIBusId),
    SYM(cuDeviceGetUuid),
    SYM(cuDeviceGetUuid_v2),
    SYM(cuDeviceTotalMem),
    SYM(cuDeviceTotalMem_v2),
    SYM(cuDeviceComputeCapability),
    SYM(cuDeviceGetAttribute),
    SYM(cuDeviceCanAccessPeer),
    SYM(cuDevicePrimaryCtxGetState),
    SYM(cuCtxGetCurrent),
    SYM(cuCtxSetCurrent),
    SYM(cuCtxGetDevice),
    SYM(cuCtxSynchronize),
    SYM(cuCtxGetApiVersion),
    SYM(cuCtxGetFlags),
    SYM(cuCtxPopCurrent),
    SYM(cuCtxPopCurrent_v2),
    SYM(cuMemGetInfo),
    SYM(cuMemGetInfo_v2),
    SYM(cuDevicePrimaryCtxRetain),
    SYM(cuDevicePrimaryCtxRelease),
    SYM(cuDevicePrimaryCtxRelease_v2),
    SYM(cuDevicePrimaryCtxReset),
    SYM(cuDevicePrimaryCtxReset_v2),
    SYM(cuDevicePrimaryCtxSetFlags),
    SYM(cuDevicePrimaryCtxSetFlags_v2),
    SYM(cuCtxCreate),
    SYM(cuCtxCreate_v2),
    SYM(cuCtxCreate_v3),
    SYM(cuCtxDestroy),
    SYM(cuCtxDestroy_v2),
    SYM(cuCtxPushCurrent),
    SYM(cuCtxPushCurrent_v2),
    SYM(cuDeviceGetLuid),
    SYM(cuDeviceGetP2PAttribute),
    SYM(cuMemAlloc),
    SYM(cuMemAlloc_v2),
    SYM(cuMemFree),
    SYM(cuMemFree_v2),
    SYM(cuMemHostAlloc),
    SYM(cuMemFreeHost),
    SYM(cuModuleLoadData),
    SYM(cuModuleLoadDataEx),
    SYM(cuStreamCreate),
    SYM(cuStreamCreateWithPriority),
    SYM(cuGetExportTable),
    SYM(cuGetProcAddress),
#undef SYM
};

static void *lookup(const char *name)
{
    for (size_t i = 0; i < sizeof cu_symbols / sizeof cu_symbols[0]; i++)
        if (strcmp(cu_symbols[i].name, name) == 0)
            return cu_symbols[i].fn;
    return NULL;
}

/* The base name resolves to its current (_v2) ABI when there is one, as libcuda does for
 * cudaVersion >= the version that introduced it. */
static CUresult get_proc(const char *symbol, void **pfn, int *status)
{
    if (!symbol || !pfn) {
        if (status)
            *status = 1;
        return CUDA_ERROR_INVALID_VALUE;
    }
    char v2[128];
    void *fn = NULL;
    if (snprintf(v2, sizeof v2, "%s_v2", symbol) < (int)sizeof v2)
        fn = lookup(v2);
    if (!fn)
        fn = lookup(symbol);
    *pfn = fn;
    if (status)
        *status = fn ? 0 : 1; /* CU_GET_PROC_ADDRESS_SUCCESS / SYMBOL_NOT_FOUND */
    if (fd_tracing())
        fprintf(stderr, "fakedriver: trace: cuda: cuGetProcAddress(%.100s) -> %s\n", symbol,
                fn ? "found" : "not found");
    return fn ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}

FD_EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion,
                                    unsigned long long flags)
{
    (void)cudaVersion;
    (void)flags;
    return get_proc(symbol, pfn, NULL);
}

FD_EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion,
                                       unsigned long long flags, int *symbolStatus)
{
    (void)cudaVersion;
    (void)flags;
    return get_proc(symbol, pfn, symbolStatus);
}
