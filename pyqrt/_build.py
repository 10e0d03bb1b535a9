"""cffi API-mode build of the native core: the public header native/qrz.h is the cdef, so the C API and the
Python view of it cannot drift apart. Run by setup.py through `cffi_modules`."""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE = os.path.join(os.path.dirname(HERE), "native")
SOURCES = ["file.c", "types.c", "kvcache.c", "cpu.c", "kernels_avx2.c", "kernels_avxvnni.c", "kernels_avx512.c", "kernels_neon.c", "model.c", "generate.c"]


def _cdef_from_header(path):
    text = open(path, encoding="utf-8").read()
    body = text.split('extern "C" {', 1)[1].rsplit("#ifdef __cplusplus", 1)[0]
    body = "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("#"))
    return re.sub(r"/\*.*?\*/", "", body, flags=re.S)


ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header(os.path.join(NATIVE, "qrz.h")))
# the piece callback and the log callback call back into Python
ffibuilder.cdef("""
extern "Python" int pyqrt_on_piece(void *, const char *, size_t);
extern "Python" void pyqrt_on_log(void *, int, const char *);
extern "Python" void pyqrt_on_matmul(void *, int64_t, const float *, int64_t, int64_t);
""")
ffibuilder.set_source(
    "pyqrt._qrz",
    '#include "qrz.h"',
    sources=[os.path.relpath(os.path.join(NATIVE, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(NATIVE)],
    extra_compile_args=["-O3", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        *os.environ.get("QRZ_EXTRA_CFLAGS", "").split()],
    extra_link_args=["-lm", "-lpthread", *os.environ.get("QRZ_EXTRA_LDFLAGS", "").split()],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
