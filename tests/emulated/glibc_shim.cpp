// Preloaded (RTLD_GLOBAL) by avx512_emulated_test.py before it imports
// bochscpu: the bochscpu-python 0.4.0 wheel is tagged manylinux_2_28 but its
// extension module was built against glibc 2.38 headers and asks for two
// C23 entry points that older glibc (Debian 12 has 2.36) lacks. They differ
// from the classic ones only in accepting "0b" binary literals, which Bochs'
// parameter parsing never sees. Where glibc has them, its own definitions are
// found first and this library is unused.
#include <cstdarg>
#include <cstdio>
#include <cstdlib>

extern "C" {

__attribute__((visibility("default"))) unsigned long long __isoc23_strtoull(const char* text,
                                                                             char** end, int base) {
  return std::strtoull(text, end, base);
}

__attribute__((visibility("default"))) int __isoc23_sscanf(const char* text, const char* format,
                                                           ...) {
  va_list args;
  va_start(args, format);
  const int converted = std::vsscanf(text, format, args);
  va_end(args);
  return converted;
}

}  // extern "C"
