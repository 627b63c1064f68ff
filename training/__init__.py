"""Training of the cross-modal hashing models (needs the ``train`` extra)."""

from cmhash.cpus import quiet_openmp_waits

quiet_openmp_waits()  # before any module here imports torch and its OpenMP runtime
