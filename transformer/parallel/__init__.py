"""Running on several devices and hosts: the data/fsdp/tensor mesh and its sharding rules, the
layout of state and batches in each mode (pmap or mesh), and JAX's multi-process runtime."""
