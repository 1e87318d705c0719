/*
 * tfgpud simulated CUDA user-space: libcublas.so.12, libcublasLt.so.12, libcufft.so.11,
 * libcusolver.so.11 and libcusparse.so.12 are built from this file, each with its own soname.
 * TensorFlow only dlopens them while listing GPUs and looks nothing up in them, so they export
 * nothing: a library that is there (or not) is all they simulate.
 */
typedef int fd_cuda_empty_library;
