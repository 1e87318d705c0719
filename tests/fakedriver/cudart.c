/*
 * tfgpud simulated CUDA user-space: libcudart.so.12, the CUDA runtime as far as TensorFlow
 * looks into it while listing GPUs (cudaRuntimeGetVersion) and a probe asks it for versions.
 * Nothing else is exported: TensorFlow only needs the library to dlopen.
 */
#define _GNU_SOURCE
#include "common.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>

typedef int cudaError_t;
enum {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorUnknown = 999,
};

static const char *const LIB = "cudart";

/* The scenario's cudart_version: the CUDA release this runtime belongs to (12050 = 12.5). */
FD_EXPORT cudaError_t cudaRuntimeGetVersion(int *runtimeVersion)
{
    fd_lock();
    const fd_scenario *sc = fd_refresh();
    int rc = cudaSuccess;
    if (!runtimeVersion) {
        rc = cudaErrorInvalidValue;
    } else if (!sc) {
        fd_report_error();
        rc = cudaErrorUnknown;
    } else {
        *runtimeVersion = sc->cudart_version;
    }
    fd_unlock();
    fd_trace(LIB, __func__, rc);
    return rc;
}

/* Like the real runtime: ask libcuda.so.1 (whichever the loader finds), 0 when there is none
 * or it cannot answer. */
typedef int (*cu_driver_get_version_fn)(int *);
static pthread_once_t driver_once = PTHREAD_ONCE_INIT;
static cu_driver_get_version_fn driver_get_version;

static void find_driver(void)
{
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (h)
        driver_get_version = (cu_driver_get_version_fn)dlsym(h, "cuDriverGetVersion");
    /* the handle is kept for the life of the process, as the real runtime does */
}

FD_EXPORT cudaError_t cudaDriverGetVersion(int *driverVersion)
{
    int rc = cudaSuccess;
    if (!driverVersion) {
        rc = cudaErrorInvalidValue;
    } else {
        pthread_once(&driver_once, find_driver);
        int v = 0;
        if (!driver_get_version || driver_get_version(&v) != 0)
            v = 0;
        *driverVersion = v;
    }
    fd_trace(LIB, __func__, rc);
    return rc;
}
