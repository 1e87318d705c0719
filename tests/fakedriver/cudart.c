/*
 * tfgpud simulated CUDA user-space: libcudart.so.12, the CUDA runtime as far as TensorFlow
 * looks into it while listing GPUs (cudaRuntimeGetVersion), a probe asks it for versions, and
 * TensorFlow selects a device before creating its context (cudaGetDevice, cudaSetDevice: with
 * tf.config.set_visible_devices). Nothing else is exported.
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
    cudaErrorInsufficientDriver = 35,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
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
typedef int (*cu_init_fn)(unsigned int);
typedef int (*cu_device_get_count_fn)(int *);
static pthread_once_t driver_once = PTHREAD_ONCE_INIT;
static cu_driver_get_version_fn driver_get_version;
static cu_init_fn driver_init;
static cu_device_get_count_fn driver_device_count;

static void find_driver(void)
{
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (h) {
        driver_get_version = (cu_driver_get_version_fn)dlsym(h, "cuDriverGetVersion");
        driver_init = (cu_init_fn)dlsym(h, "cuInit");
        driver_device_count = (cu_device_get_count_fn)dlsym(h, "cuDeviceGetCount");
    }
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

/* The calling thread's current device, as the runtime keeps it (0 until cudaSetDevice). */
static __thread int current_device;

FD_EXPORT cudaError_t cudaGetDevice(int *device)
{
    int rc = cudaSuccess;
    if (!device)
        rc = cudaErrorInvalidValue;
    else
        *device = current_device;
    fd_trace(LIB, __func__, rc);
    return rc;
}

/* Checks the ordinal against libcuda's device count (initialising the driver as the runtime
 * does) and makes it current. Unlike the real runtime it creates no context: the context is
 * made (and refused) where TensorFlow asks libcuda for it, cuDevicePrimaryCtxRetain. */
FD_EXPORT cudaError_t cudaSetDevice(int device)
{
    pthread_once(&driver_once, find_driver);
    int rc = cudaSuccess;
    int count = 0;
    if (!driver_init || !driver_device_count) {
        rc = cudaErrorInsufficientDriver;
    } else if (driver_init(0) != 0 || driver_device_count(&count) != 0 || count == 0) {
        rc = cudaErrorNoDevice;
    } else if (device < 0 || device >= count) {
        rc = cudaErrorInvalidDevice;
    } else {
        current_device = device;
    }
    fd_trace(LIB, __func__, rc);
    return rc;
}
