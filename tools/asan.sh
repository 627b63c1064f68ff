#!/usr/bin/env bash
# Build the native extension cmhash._hamming with AddressSanitizer and UndefinedBehaviorSanitizer
# and run tests against it. The normal build is left untouched: the sanitized copy of the
# package goes to build/asan/ and is put first on PYTHONPATH for this run only.
#
#   tools/asan.sh                      # the native tests (kernels, search, index, metrics, fuzz)
#   tools/asan.sh tests/test_index.py  # any pytest arguments
#
# Needs gcc with libasan/libubsan. PYTHON picks the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=build/asan
rm -rf "$out"
mkdir -p "$out"
cp -r sdk/cmhash "$out/cmhash"
rm -f "$out"/cmhash/_hamming*.so
include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
suffix=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
gcc -shared -fPIC -O1 -g -std=c11 -pthread -fno-omit-frame-pointer \
    -fsanitize=address,undefined -fno-sanitize-recover=undefined \
    -Wall -Wextra -Wno-unused-parameter -I"$include" -Inative native/*.c \
    -o "$out/cmhash/_hamming$suffix"

if [ $# -eq 0 ]; then
    # Left out: two tests that start processes the sanitizer runtime cannot follow (qemu, and a
    # subprocess given a clean environment without LD_PRELOAD); they run in the plain build.
    set -- tests/test_native_kernels.py tests/test_search.py tests/test_index.py tests/test_metrics.py \
        tests/robustness/test_native.py tests/robustness/test_native_fuzz.py \
        --deselect tests/test_native_kernels.py::test_kernels_on_an_avx2_cpu_under_qemu \
        --deselect tests/test_metrics.py::test_native_rank_metrics_fuzz_never_crashes
fi
# Python itself is not built with ASan: preload the runtime, and ignore the interpreter's
# deliberate leaks at exit. Any sanitizer report aborts the run.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$PWD/$out${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c 'import cmhash._hamming as h, sys; assert "build/asan" in h.__file__, h.__file__; print("sanitized:", h.__file__, file=sys.stderr)'
exec "$python" -m pytest -q -p no:cacheprovider "$@"
