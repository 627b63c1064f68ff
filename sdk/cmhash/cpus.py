"""How many CPUs this process may really use, and thread pools that sleep while they wait.

A thread pool sized for every core of the machine fights itself when the process may only
run on some of them (a CPU affinity mask, a container's CPU quota) or shares them with other
busy jobs: threads that spin while waiting for a descheduled peer burn the time that peer
needs. cmhash sizes torch's and onnxruntime's pools with :func:`available_cpus` and makes
their idle threads sleep instead of spin.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what :mod:`platform` says: what
    every benchmark prints beside its figures."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cpus(cgroup_root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> int:
    """The CPUs this process can run on: its affinity mask, capped by any cgroup CPU quota
    (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``) of its cgroup or
    an ancestor, rounded up; at least 1. The two paths are parameters so that tests can
    point them at files they write."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_cpu_quota(cgroup_root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """The smallest CPU quota, in CPUs, set on this process's cgroup or an ancestor; None if none is set."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    root = Path(cgroup_root)
    quotas = []
    for line in lines:  # "hierarchy-id:controllers:path"; v2 is "0::path"
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            quotas += [_v2_quota(d / "cpu.max") for d in _self_and_ancestors(root, path)]
        elif "cpu" in controllers.split(","):
            for mount in {root / controllers, root / "cpu"}:
                quotas += [_v1_quota(d) for d in _self_and_ancestors(mount, path)]
    quotas = [q for q in quotas if q is not None]
    return min(quotas) if quotas else None


def _self_and_ancestors(mount: Path, path: str) -> list[Path]:
    # Inside a container the mount's root is often the container's own cgroup, so the
    # mount root itself is always a candidate too.
    parts = [p for p in path.strip("/").split("/") if p]
    return [mount.joinpath(*parts[:k]) for k in range(len(parts), -1, -1)]


def _v2_quota(cpu_max: Path) -> float | None:
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def quiet_openmp_waits() -> None:
    """Make OpenMP threads sleep, not spin, while they wait (``OMP_WAIT_POLICY=PASSIVE``),
    unless the user chose a policy. Read once when the OpenMP runtime loads, so this must
    run before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
