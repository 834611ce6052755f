/* zinf's C API: opaque handles, zinf_<object>_<verb> functions, a status
 * code from every call that can fail, and the failure's message (and errno)
 * from zinf_last_error_message() / zinf_last_error_errno() on the same
 * thread. Nothing here throws or prints.
 *
 *   pkg-config --cflags --libs zinf
 */
#ifndef ZINF_H
#define ZINF_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum zinf_status {
  ZINF_OK = 0,
  ZINF_ERROR_CONFIG = 1,      /* bad configuration; the message names the key path */
  ZINF_ERROR_INVALID = 2,     /* bad argument */
  ZINF_ERROR_IO = 3,          /* a system call failed: path, offset and errno in the message */
  ZINF_ERROR_NO_SPACE = 4,    /* ENOSPC / EDQUOT */
  ZINF_ERROR_ALIGNMENT = 5,   /* an O_DIRECT transfer not aligned */
  ZINF_ERROR_UNSUPPORTED = 6, /* missing capability (kernel, filesystem, build) */
  ZINF_ERROR_RESOURCE = 7,    /* memory, pinned budget, memlock limit */
  ZINF_ERROR_TIMEOUT = 8,
  ZINF_ERROR_CANCELLED = 9,
  ZINF_ERROR_CORRUPT = 10,    /* stored data fails its checksum */
  ZINF_ERROR_IN_USE = 11,     /* a swap directory locked by another run */
  ZINF_ERROR_COMM = 12,       /* a collective failed */
  ZINF_ERROR_INTERNAL = 13
} zinf_status;

/* The message of this thread's last failed call ("" when none); valid until
 * the thread's next zinf call. */
const char* zinf_last_error_message(void);
/* The errno of this thread's last failed call, 0 when it was not a system call. */
int zinf_last_error_errno(void);
const char* zinf_status_name(zinf_status status);
const char* zinf_version(void);

/* ---- configuration: a DeepSpeed JSON ---------------------------------- */
typedef struct zinf_config zinf_config;
zinf_status zinf_config_load_file(const char* path, zinf_config** out);
zinf_status zinf_config_load_string(const char* json, zinf_config** out);
void zinf_config_destroy(zinf_config* config);
int zinf_config_zero_stage(const zinf_config* config);

/* ---- asynchronous file I/O (DeepSpeed's aio_handle) -------------------- */
typedef struct zinf_aio_options {
  uint64_t block_size;            /* bytes per I/O piece (1 MiB) */
  uint32_t queue_depth;           /* pieces in flight per ring (128) */
  uint32_t intra_op_parallelism;  /* rings (1) */
  int single_submit;              /* 0 */
  int overlap_events;             /* 0 */
} zinf_aio_options;

/* DeepSpeed's aio_handle defaults. */
zinf_aio_options zinf_aio_options_default(void);

typedef struct zinf_aio_handle zinf_aio_handle;
zinf_status zinf_aio_handle_create(const zinf_aio_options* options, zinf_aio_handle** out);
/* Waits for queued transfers (ignoring their errors), then frees. */
void zinf_aio_handle_destroy(zinf_aio_handle* handle);
/* Reads / writes `bytes` at `file_offset` of `path`, any buffer address and
 * length. With async_op the call returns once queued and the buffer must
 * stay valid until zinf_aio_handle_wait(). */
zinf_status zinf_aio_handle_pread(zinf_aio_handle* handle, void* buffer, uint64_t bytes, const char* path,
                                  uint64_t file_offset, int async_op);
zinf_status zinf_aio_handle_pwrite(zinf_aio_handle* handle, const void* buffer, uint64_t bytes, const char* path,
                                   uint64_t file_offset, int async_op);
/* Waits for every queued transfer; `completed` (may be NULL) receives their count. */
zinf_status zinf_aio_handle_wait(zinf_aio_handle* handle, uint64_t* completed);

/* ---- CPU optimizers ------------------------------------------------------ */
typedef enum zinf_dtype { ZINF_F32 = 0, ZINF_BF16 = 1, ZINF_F16 = 2 } zinf_dtype;

typedef struct zinf_tensor {
  void* data;   /* NULL for an unused state */
  size_t count; /* elements */
  zinf_dtype dtype;
} zinf_tensor;

typedef struct zinf_tensor_state {
  zinf_tensor param;
  zinf_tensor grad;
  zinf_tensor exp_avg;     /* Adam, Lion */
  zinf_tensor exp_avg_sq;  /* Adam, Adagrad */
  zinf_tensor param_copy;  /* optional bf16/fp16 copy of the updated param */
} zinf_tensor_state;

typedef struct zinf_adam_options {
  float lr, beta1, beta2, eps, weight_decay;
  int adamw_mode;       /* 1: decoupled weight decay */
  int bias_correction;  /* 1 */
} zinf_adam_options;

zinf_adam_options zinf_adam_options_default(void);

typedef struct zinf_cpu_optimizer zinf_cpu_optimizer;
/* threads 0: every hardware thread. */
zinf_status zinf_cpu_optimizer_create(size_t threads, zinf_cpu_optimizer** out);
void zinf_cpu_optimizer_destroy(zinf_cpu_optimizer* optimizer);
/* One Adam step (step counted from 1) over `count` tensors. */
zinf_status zinf_cpu_optimizer_adam_step(zinf_cpu_optimizer* optimizer, const zinf_adam_options* options,
                                         int64_t step, const zinf_tensor_state* tensors, size_t count);
/* "avx512", "avx2" or "scalar". */
const char* zinf_cpu_optimizer_tier(const zinf_cpu_optimizer* optimizer);

/* ---- the swap store: named, checksummed tensors on NVMe ------------------ */
typedef struct zinf_swap_store zinf_swap_store;
/* One or more directories (striped); created when missing; locked against
 * other runs. */
zinf_status zinf_swap_store_open(const char* const* directories, size_t count, zinf_swap_store** out);
/* Closes without committing: writes since the last commit are forgotten. */
void zinf_swap_store_close(zinf_swap_store* store);
zinf_status zinf_swap_store_write(zinf_swap_store* store, const char* key, const void* data, uint64_t bytes);
/* `bytes` receives the stored size; `capacity` is the room at `out`. */
zinf_status zinf_swap_store_read(zinf_swap_store* store, const char* key, void* out, uint64_t capacity,
                                 uint64_t* bytes);
/* Makes every write durable, atomically. */
zinf_status zinf_swap_store_commit(zinf_swap_store* store);

#ifdef __cplusplus
}
#endif

#endif /* ZINF_H */
