/* A C program that knows zinf only through <zinf.h> and pkg-config: it
 * writes and reads a file through the aio handle, steps Adam, round-trips a
 * tensor through the swap store, and checks an error's status, message and
 * errno. Exits 0 when all of it behaves. Usage: consumer SCRATCH_DIR */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zinf.h>

#define CHECK(call)                                                                            \
  do {                                                                                         \
    zinf_status status_ = (call);                                                              \
    if (status_ != ZINF_OK) {                                                                  \
      fprintf(stderr, "%s failed: %s: %s\n", #call, zinf_status_name(status_), zinf_last_error_message()); \
      return 1;                                                                                \
    }                                                                                          \
  } while (0)

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  char path[4096];
  snprintf(path, sizeof path, "%s/consumer.bin", argv[1]);

  zinf_aio_handle* handle = NULL;
  zinf_aio_options options = zinf_aio_options_default();
  CHECK(zinf_aio_handle_create(&options, &handle));
  enum { N = 100003 };
  float* out = malloc(N * sizeof(float));
  float* back = malloc(N * sizeof(float));
  for (int i = 0; i < N; ++i) out[i] = (float)i * 0.5f;
  CHECK(zinf_aio_handle_pwrite(handle, out, N * sizeof(float), path, 0, 1));
  uint64_t done = 0;
  CHECK(zinf_aio_handle_wait(handle, &done));
  CHECK(zinf_aio_handle_pread(handle, back, N * sizeof(float), path, 0, 0));
  if (done != 1 || memcmp(out, back, N * sizeof(float)) != 0) {
    fprintf(stderr, "aio round trip differs\n");
    return 1;
  }
  char missing[4096];
  snprintf(missing, sizeof missing, "%s/missing.bin", argv[1]);
  if (zinf_aio_handle_pread(handle, back, 4096, missing, 0, 0) != ZINF_ERROR_IO ||
      zinf_last_error_errno() != ENOENT || strstr(zinf_last_error_message(), "missing.bin") == NULL) {
    fprintf(stderr, "a missing file did not fail with ZINF_ERROR_IO/ENOENT naming it: %s\n", zinf_last_error_message());
    return 1;
  }
  zinf_aio_handle_destroy(handle);

  zinf_cpu_optimizer* optimizer = NULL;
  CHECK(zinf_cpu_optimizer_create(1, &optimizer));
  float param[4] = {1, 1, 1, 1}, grad[4] = {1, -1, 1, -1}, m[4] = {0}, v[4] = {0};
  zinf_tensor_state state = {{param, 4, ZINF_F32}, {grad, 4, ZINF_F32}, {m, 4, ZINF_F32}, {v, 4, ZINF_F32}, {NULL, 0, ZINF_F32}};
  zinf_adam_options adam = zinf_adam_options_default();
  adam.lr = 0.1f;
  CHECK(zinf_cpu_optimizer_adam_step(optimizer, &adam, 1, &state, 1));
  /* First Adam step: p -= lr * sign(g) (up to eps). */
  if (fabsf(param[0] - 0.9f) > 1e-5f || fabsf(param[1] - 1.1f) > 1e-5f) {
    fprintf(stderr, "adam step: %f %f\n", param[0], param[1]);
    return 1;
  }
  adam.lr = NAN;
  if (zinf_cpu_optimizer_adam_step(optimizer, &adam, 2, &state, 1) != ZINF_ERROR_INVALID) return 1;
  printf("cpu optimizer tier: %s\n", zinf_cpu_optimizer_tier(optimizer));
  zinf_cpu_optimizer_destroy(optimizer);

  char store_dir[4096];
  snprintf(store_dir, sizeof store_dir, "%s/store", argv[1]);
  const char* dirs[] = {store_dir};
  zinf_swap_store* store = NULL;
  CHECK(zinf_swap_store_open(dirs, 1, &store));
  CHECK(zinf_swap_store_write(store, "layer0.weight", out, 12345));
  CHECK(zinf_swap_store_commit(store));
  uint64_t size = 0;
  memset(back, 0, N * sizeof(float));
  CHECK(zinf_swap_store_read(store, "layer0.weight", back, N * sizeof(float), &size));
  if (size != 12345 || memcmp(out, back, 12345) != 0) return 1;
  zinf_swap_store_close(store);

  zinf_config* config = NULL;
  if (zinf_config_load_string("{\"zero_optimization\": {\"stage\": 7}}", &config) != ZINF_ERROR_CONFIG ||
      strstr(zinf_last_error_message(), "zero_optimization.stage") == NULL) {
    return 1;
  }
  CHECK(zinf_config_load_string("{\"zero_optimization\": {\"stage\": 3}}", &config));
  if (zinf_config_zero_stage(config) != 3) return 1;
  zinf_config_destroy(config);
  free(out);
  free(back);
  printf("zinf %s: C consumer ok\n", zinf_version());
  return 0;
}
