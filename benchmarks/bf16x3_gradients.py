"""Probe (not part of the library): how far would an LSTM training step's gradients move if its products were
bf16x3, as AMX would run them (each fp32 operand split into bf16 hi + lo, three products A_hi W_hi + A_hi W_lo +
A_lo W_hi, accumulated in fp32)? Emulated in JAX on any CPU: the forward's two products per step and, through a
custom VJP, the backward's (δh, dxs and the weight gradients) all bf16x3. Prints the largest gradient error of fp32
products and of bf16x3 products against the same step in float64, and the share of gradient elements outside the
tolerance of jaxseq's gradient tests (|err| <= 1e-6 + 1e-5 |grad|, tests/helpers.py).

    .venv/bin/python benchmarks/bf16x3_gradients.py 8,20,16,32 64,34,200,256 32,500,64,128   # B,T,I,H ...

See benchmarks/RESULTS.md, "AMX bf16 splits, measured" (and benchmarks/amx_probe.cc for their speed).
"""
import sys

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from jaxseq import cells  # noqa: E402


def dot_exact(a, b):
    return jnp.dot(a, b, precision=lax.Precision.HIGHEST)


def _split(a):
    hi = a.astype(jnp.bfloat16).astype(a.dtype)
    return hi, (a - hi).astype(jnp.bfloat16).astype(a.dtype)


@jax.custom_vjp
def dot_bf16x3(a, b):
    """a @ b from bf16 parts; each part's product is exact in fp32, as in AMX's TDPBF16PS."""
    (a_hi, a_lo), (b_hi, b_lo) = _split(a), _split(b)
    return dot_exact(a_hi, b_hi) + (dot_exact(a_hi, b_lo) + dot_exact(a_lo, b_hi))


dot_bf16x3.defvjp(lambda a, b: (dot_bf16x3(a, b), (a, b)),
                  lambda res, g: (dot_bf16x3(g, res[1].T), dot_bf16x3(res[0].T, g)))


def lstm_gradients(params, xs, r, dot):
    """Gradients of sum(ys * r) with respect to params and xs [B, T, I], the LSTM's products done by `dot`."""
    def loss(params, xs):
        batch, hidden = xs.shape[0], params["W"].shape[0]

        def step(carry, x):
            h, c = carry
            z = dot(x, params["U"]) + dot(h, params["W"]) + params["b"]
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((batch, hidden), xs.dtype)
        _, ys = lax.scan(step, (zeros, zeros), jnp.swapaxes(xs, 0, 1))
        return jnp.sum(jnp.swapaxes(ys, 0, 1) * r)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, xs)


def main(shapes):
    for shape in shapes:
        B, T, I, H = map(int, shape.split(","))
        params = cells.lstm.init(jax.random.PRNGKey(0), I, H)
        xs = jax.random.normal(jax.random.PRNGKey(1), (B, T, I), jnp.float32)
        r = jax.random.normal(jax.random.PRNGKey(2), (B, T, H), jnp.float32)
        as64 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)  # noqa: E731
        reference = jax.tree.leaves(lstm_gradients(as64(params), as64(xs), as64(r), dot_exact))
        report = []
        for name, dot in (("fp32", dot_exact), ("bf16x3", dot_bf16x3)):
            got = jax.tree.leaves(lstm_gradients(params, xs, r, dot))
            error = max(float(jnp.max(jnp.abs(g - e))) for g, e in zip(got, reference))
            relative = max(float(jnp.max(jnp.abs(g - e)) / jnp.max(jnp.abs(e))) for g, e in zip(got, reference))
            outside = sum(int(jnp.sum(jnp.abs(g - e) > 1e-6 + 1e-5 * jnp.abs(e))) for g, e in zip(got, reference))
            share = outside / sum(e.size for e in reference)
            report.append(f"{name}: max |err| {error:.2e}, max |err| / max |grad| {relative:.2e}, "
                          f"outside the tests' tolerance {share:.1%}")
        print(f"(B, T, I, H) = ({shape})  " + " | ".join(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["8,20,16,32", "64,34,200,256", "32,500,64,128"])
