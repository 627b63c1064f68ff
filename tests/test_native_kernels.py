"""The native kernels on their own, without Python: tests/native/check_kernels.c checks
distances, kNN, radius search and the label-overlap test against naive references at every
SIMD level, built for this machine and, when qemu (and a cross compiler) are installed, run
on an emulated x86-64 CPU without AVX-512 and on an emulated ARM64 CPU."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

import cmhash._hamming as h

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "native" / f for f in ("kernels.c", "search_core.c", "threads.c")] + [
    ROOT / "tests" / "native" / "check_kernels.c"
]
# The extension's flags (setup.py), warnings included: the kernels must build cleanly.
CFLAGS = ["-O3", "-std=c11", "-pthread", "-Wall", "-Wextra", "-Wno-unused-parameter", f"-I{ROOT / 'native'}"]
ARM64_SYSROOT = Path("/usr/aarch64-linux-gnu")


def build(compiler: str, out: Path) -> Path:
    proc = subprocess.run([compiler, *CFLAGS, *map(str, SOURCES), "-o", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "warning" not in proc.stderr, proc.stderr[-4000:]
    return out


def levels_checked(stdout: str) -> list[str]:
    """The levels the driver ran, from its per-level lines ('avx2  123 checks, 0 failed')."""
    return [line.split()[0] for line in stdout.splitlines() if line.endswith(" failed") and " checks, " in line
            and not line.startswith(("OK", "FAILED"))]


def host_build(tmp_path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc or gcc) on PATH")
    return build(compiler, tmp_path / "check_kernels")


def test_kernels_on_this_machine(tmp_path):
    exe = host_build(tmp_path)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "OK:" in proc.stdout
    # The driver and the extension see the same CPU and the same dispatch.
    assert levels_checked(proc.stdout) == h.simd_levels()


def test_kernels_on_an_avx2_cpu_under_qemu(tmp_path):
    """Haswell: AVX2 and POPCNT, no AVX-512. The run-time choice must stop at avx2, and no
    AVX-512 instruction may leak into the lower levels (qemu would stop on it)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"x86-64 only (this machine is {platform.machine()})")
    if shutil.which("qemu-x86_64") is None:
        pytest.skip("qemu-x86_64 not installed (Debian: qemu-user)")
    exe = host_build(tmp_path)
    proc = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", str(exe)], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, timeout=900)  # stderr: qemu's CPUID notes
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "OK:" in proc.stdout
    assert levels_checked(proc.stdout) == ["generic", "popcnt", "avx2"]


def test_kernels_on_arm64_under_qemu(tmp_path):
    missing = [tool for tool in ("aarch64-linux-gnu-gcc", "qemu-aarch64") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: gcc-aarch64-linux-gnu, qemu-user)")
    if not ARM64_SYSROOT.is_dir():
        pytest.skip(f"no ARM64 C library at {ARM64_SYSROOT} (Debian: libc6-dev-arm64-cross)")
    exe = build("aarch64-linux-gnu-gcc", tmp_path / "check_kernels_arm64")
    proc = subprocess.run(["qemu-aarch64", "-L", str(ARM64_SYSROOT), str(exe)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "OK:" in proc.stdout
    assert levels_checked(proc.stdout) == ["generic", "neon"]
