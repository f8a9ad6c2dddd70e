"""The persistent kernel's frame alone (96 programs): an empty kernel, and one with its two grid
barriers, chained over 30 layers; microseconds a layer."""
import functools, time, jax, jax.numpy as jnp
import persistent_finish as P
ws = P.make_weights(P.CONFIG, P.CONFIG.num_layers, jnp.bfloat16)
x = jnp.ones((16, 576), jnp.bfloat16)
fns = {k: functools.partial(jax.jit(functools.partial(P.chain, kind=k, eps=1e-5)), ws=ws)
       for k in ('empty', 'barriers', 'xla', 'persistent')}
for t in range(3):
  for k, f in fns.items():
    f(x, x).block_until_ready(); t0 = time.perf_counter()
    for _ in range(50): y = f(x, x)
    y.block_until_ready()
    print(t, k, '%.2f us/layer' % ((time.perf_counter() - t0) / 50 / len(ws) * 1e6), flush=True)
