"""§5.4 Residual dropout, with random numbers cheap enough not to slow the step down."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_LEVELS = 1 << 16  # each element's draw is a 16-bit integer


def _mix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def counter_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 random words for `shape`: a keyed hash of each element's position (counter-based, as
    Philox is). Unlike jax.random.bits it is plain element-wise arithmetic, which XLA fuses into the
    ops that use the bits instead of running a separate generator over a separate buffer."""
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    counter = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        counter = counter + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % (1 << 32))
        stride *= shape[axis]
    return _mix32(_mix32(counter * jnp.uint32(0x9E3779B9) + seeds[0]) ^ seeds[1])


class Dropout(nnx.Module):
    """Zero each element with probability `rate` and scale the rest by 1 / (1 - rate).

    Same contract as nnx.Dropout; the draws are cheaper (benchmarks/README.md): each element gets a
    16-bit integer, two cut from each 32-bit word of `counter_bits`, and is dropped when it is below
    round(rate · 2^16). The rate is realised to within 2^-17 (0.1 becomes 6554/65536 = 0.100006) and
    the scale uses the realised keep probability, so the expectation is exact: the kept values are
    multiplied by 1 / keep_prob in float32 and rounded to x's dtype once. (Scaling in bfloat16 would
    round the factor itself, 1/0.9 to 1.109375, and shrink every kept value by 0.16%; one rounding of
    each product is instead unbiased over values, and is what storing the result in x's dtype costs.)
    """

    def __init__(self, rate: float):
        self.rate = rate
        self.threshold = int(round(rate * _LEVELS))

    def __call__(self, x: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | jax.Array | None = None):
        if deterministic or self.threshold == 0:
            return x
        if rngs is None:
            raise ValueError("dropout in training mode needs a key: pass rngs=nnx.Rngs(dropout=key)")
        key = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs
        keep_prob = 1.0 - self.threshold / _LEVELS
        if x.shape and x.shape[-1] % 2 == 0:
            words = counter_bits(key, (*x.shape[:-1], x.shape[-1] // 2))
            draws = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(x.shape)
        else:
            draws = (counter_bits(key, x.shape) >> 16).astype(jnp.uint16)
        keep = draws >= jnp.uint16(self.threshold)
        scaled = (x.astype(jnp.promote_types(x.dtype, jnp.float32)) * (1.0 / keep_prob)).astype(x.dtype)
        return jnp.where(keep, scaled, jnp.zeros((), x.dtype))
