"""cmhash.cpus: the CPUs a process may use (affinity set for real in a subprocess, cgroup
quotas read from files written here), and the thread settings that follow from it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cmhash.cpus import available_cpus, cgroup_cpu_quota

HERE = Path(__file__).resolve().parent


def run_python(code: str, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=HERE,
                          env={**os.environ, **(env or {})}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def cgroup(tmp_path, proc_line: str, files: dict[str, str]):
    """A /proc/self/cgroup line and cgroup files under a fake mount; returns the two paths."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "cgroup"
    proc.write_text(proc_line + "\n")
    for name, text in files.items():
        (tmp_path / "root" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "root" / name).write_text(text)
    return tmp_path / "root", proc


def test_affinity_mask_is_counted():
    cpus = sorted(os.sched_getaffinity(0))
    out = run_python(f"""
        import os
        from cmhash.cpus import available_cpus
        print(available_cpus(proc_cgroup="/nonexistent"))
        os.sched_setaffinity(0, {{{cpus[0]}}})
        print(available_cpus(proc_cgroup="/nonexistent"))
    """)
    assert out.split() == [str(len(cpus)), "1"]


def test_cgroup_v2_quota_of_the_cgroup_or_an_ancestor(tmp_path):
    root, proc = cgroup(tmp_path, "0::/a/b", {"a/b/cpu.max": "150000 100000\n", "a/cpu.max": "max 100000\n"})
    assert cgroup_cpu_quota(root, proc) == 1.5
    assert available_cpus(root, proc) == min(len(os.sched_getaffinity(0)), 2)  # rounded up
    (root / "a" / "cpu.max").write_text("50000 100000\n")  # a tighter parent wins
    assert cgroup_cpu_quota(root, proc) == 0.5
    assert available_cpus(root, proc) == 1
    (root / "a" / "b" / "cpu.max").write_text("max 100000\n")
    (root / "a" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(root, proc) is None


def test_cgroup_v2_mount_root_is_the_containers_own_cgroup(tmp_path):
    root, proc = cgroup(tmp_path, "0::/docker/abc", {"cpu.max": "100000 100000\n"})  # the path is not under the mount
    assert cgroup_cpu_quota(root, proc) == 1.0 and available_cpus(root, proc) == 1


def test_cgroup_v1_cfs_quota(tmp_path):
    files = {"cpu,cpuacct/x/cpu.cfs_quota_us": "100000\n", "cpu,cpuacct/x/cpu.cfs_period_us": "100000\n"}
    root, proc = cgroup(tmp_path, "4:cpu,cpuacct:/x", files)
    assert cgroup_cpu_quota(root, proc) == 1.0 and available_cpus(root, proc) == 1
    (root / "cpu,cpuacct" / "x" / "cpu.cfs_quota_us").write_text("-1\n")  # no limit
    assert cgroup_cpu_quota(root, proc) is None
    root, proc = cgroup(tmp_path / "only-cpu", "3:cpu:/", {"cpu/cpu.cfs_quota_us": "250000\n",
                                                           "cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_quota(root, proc) == 2.5


def test_no_cgroup_information_means_no_quota(tmp_path):
    assert cgroup_cpu_quota(tmp_path, tmp_path / "missing") is None
    root, proc = cgroup(tmp_path, "1:memory:/m", {})
    assert cgroup_cpu_quota(root, proc) is None
    assert available_cpus(root, proc) == len(os.sched_getaffinity(0))


def test_onnxruntime_sessions_use_the_available_cpus_and_do_not_spin():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = run_python("""
        import os
        from cmhash.backends import ModelSpec
        from cmhash.backends.onnxruntime_backend import OnnxRuntimeBackend
        from fixtures.towers import random_weights, text_onnx

        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        spec = ModelSpec("text model", "bow", ("batch", 8), "codes", 16)
        for threads in (None, 3):
            options = OnnxRuntimeBackend(text_onnx(random_weights(16, 8)), spec, threads=threads).session.get_session_options()
            print(options.intra_op_num_threads, options.get_session_config_entry("session.intra_op.allow_spinning"),
                  options.get_session_config_entry("session.inter_op.allow_spinning"))
    """)
    assert out.splitlines() == ["1 0 0", "3 0 0"]  # an explicit count still wins


@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_training_makes_openmp_threads_sleep_unless_the_user_chose(preset, expected):
    pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    proc = subprocess.run([sys.executable, "-c", "import os, sys; import cmhash.training.trainer; "
                           "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [expected, "True"]


def test_torch_threads_never_exceed_the_available_cpus():
    pytest.importorskip("torch")
    out = run_python("""
        import os
        import torch
        from cmhash.training.trainer import fit_torch_threads

        torch.set_num_threads(8)
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        fit_torch_threads()
        print(torch.get_num_threads(), torch.get_num_interop_threads())
    """)
    assert out.split() == ["1", "1"]
