"""Running on several devices and hosts: pmap's device layout and JAX's multi-process runtime."""
