/*
 * tfgpud simulated CUDA user-space: libcudnn.so.9 (FD_CUDNN_MAJOR=9) and libcudnn.so.8
 * (FD_CUDNN_MAJOR=8). Exports the two version calls TensorFlow looks up while listing GPUs,
 * cudnnGetVersion and cudnnGetProperty; the answer is the scenario's cudnn_version.
 */
#define _GNU_SOURCE
#include "common.h"

#include <stddef.h>

#if FD_CUDNN_MAJOR == 9
/* cuDNN 9 numbers its status codes by category (cudnn_graph.h) */
enum { CUDNN_STATUS_SUCCESS = 0, CUDNN_STATUS_BAD_PARAM = 2000, CUDNN_STATUS_INTERNAL_ERROR = 4000 };
#define FD_CUDNN_DEFAULT_VERSION 90300 /* 9.3.0, what TensorFlow 2.21 was built with */
#elif FD_CUDNN_MAJOR == 8
enum { CUDNN_STATUS_SUCCESS = 0, CUDNN_STATUS_BAD_PARAM = 3, CUDNN_STATUS_INTERNAL_ERROR = 4 };
#define FD_CUDNN_DEFAULT_VERSION 8907 /* 8.9.7, the last cuDNN 8 */
#else
#error "build with -DFD_CUDNN_MAJOR=9 or -DFD_CUDNN_MAJOR=8"
#endif

typedef int cudnnStatus_t;
typedef enum { MAJOR_VERSION = 0, MINOR_VERSION = 1, PATCH_LEVEL = 2 } libraryPropertyType;

static const char *const LIB = "cudnn";

/* The version the scenario asks for, 0 when the scenario is missing or malformed. */
static int version(void)
{
    fd_lock();
    const fd_scenario *sc = fd_refresh();
    int v = 0;
    if (!sc)
        fd_report_error();
    else
        v = sc->cudnn_version ? sc->cudnn_version : FD_CUDNN_DEFAULT_VERSION;
    fd_unlock();
    return v;
}

FD_EXPORT size_t cudnnGetVersion(void)
{
    int v = version();
    fd_trace(LIB, __func__, v);
    return (size_t)v;
}

/* Both encodings: cuDNN 9 and later major*10000 + minor*100 + patch (90300 = 9.3.0), cuDNN 8
 * and earlier major*1000 + minor*100 + patch (8907 = 8.9.7). */
FD_EXPORT cudnnStatus_t cudnnGetProperty(libraryPropertyType type, int *value)
{
    int rc = CUDNN_STATUS_SUCCESS;
    int v = version();
    int major = v >= 10000 ? v / 10000 : v / 1000;
    int minor = v >= 10000 ? v / 100 % 100 : v / 100 % 10;
    if (!value || (type != MAJOR_VERSION && type != MINOR_VERSION && type != PATCH_LEVEL))
        rc = CUDNN_STATUS_BAD_PARAM;
    else if (v == 0)
        rc = CUDNN_STATUS_INTERNAL_ERROR;
    else
        *value = type == MAJOR_VERSION ? major : type == MINOR_VERSION ? minor : v % 100;
    fd_trace(LIB, __func__, rc);
    return rc;
}
