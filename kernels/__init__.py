"""Triton kernels, one file per op (installed as fastbb.kernels). Launchers only; ops live in fastbb.ops."""
