"""The matrix product of a decoding pass's few rows on a CPU: a hand-written kernel
(`cpu_product.cc`) beside the plain `x @ w` it is tested against.

XLA's CPU products read a weight at memory speed for one row, but at a third to a half of it
from two rows on, so a CPU's 3-row pass cost 1.4x a 1-row one. The kernel reads each weight
once for up to `MAX_ROWS` rows, at memory speed: SmolLM2-135M's layer products for 3 rows in
about the time of XLA's for 1 (docs/results/cpu/row_kernel/). It sums each output element in
one fixed order, whatever the row count, so a row rounds the same in any pass the kernel runs;
it rounds differently from XLA's multi-row products.

The kernel is C++ built on first use with this machine's compiler (`c++`, for this machine's
vectors) against jaxlib's FFI headers, into one library with `cpu_attention`'s kernel, kept in
a cache directory (`build_dir`) keyed by their sources, the compiler and its flags, jaxlib and
the CPU. Where it cannot be built (no compiler), or off a CPU, or for other dtypes, and for
passes wider than `MAX_ROWS`, `product` is `x @ w`.

Which a decoder uses is its choice (`Decoder(cpu_kernel=...)`), set while its programs are
traced (`use_kernel`): all of a decoder's passes multiply one way, so its methods stay exact
against its plain decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import contextvars
import ctypes
import functools
import hashlib
import importlib.resources
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from clasp_jax import xla_options

#: The rows the kernel takes: a CPU's passes are 3 rows wide (`widths`), its plain steps 1 row
#: where a decoder computes rows apart (`engine.Decoder`'s `rows_apart`: one row through the
#: kernel rounds as the same row among three). Wider passes (prefill chunks) compute rather
#: than wait for memory, and XLA's products are faster there.
MIN_ROWS, MAX_ROWS = 1, 3

#: This package's CPU kernels, built into one library: their sources, the header they share,
#: and the FFI target each handler symbol is registered as (`cpu_attention` runs the second).
_SOURCES = ('cpu_product.cc', 'cpu_attention.cc')
_HEADERS = ('cpu_tasks.h',)
#: The compiler's flags (part of the built library's key). -ffp-contract=fast: products and
#: sums as fused multiply-adds; -fno-trapping-math: the attention's exponentials over a block
#: vectorise (the compiler may assume no floating-point trap). Neither reorders a sum, so a
#: row's result still depends on nothing but its row.
_FLAGS = ('-O3', '-march=native', '-ffp-contract=fast', '-fno-trapping-math', '-std=c++17')
TARGETS = {'RowsProduct': 'clasp_jax_rows_product', 'RowAttention': 'clasp_jax_row_attention'}

#: The library registered with XLA, once registered.
_registered: list[str] = []

_USE_KERNEL: contextvars.ContextVar[bool | None] = contextvars.ContextVar('use_kernel',
                                                                         default=None)


def build_dir() -> str:
  """Where built kernels are kept: `$CLASP_JAX_CACHE`, else `$XDG_CACHE_HOME/clasp_jax`, else
  `~/.cache/clasp_jax`."""
  if 'CLASP_JAX_CACHE' in os.environ:
    return os.environ['CLASP_JAX_CACHE']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'clasp_jax')


def _compile(compiler: str, files: dict[str, bytes], library: str) -> None:
  """Compiles the kernels' sources, beside their headers (`files`, name: text), with
  `compiler` into the shared library `library` (written whole, then renamed into place, so
  that processes building it at once never load half a file)."""
  path = shutil.which(compiler)
  if path is None:
    raise OSError(f'no C++ compiler ({compiler}: c++ or $CXX) on PATH')
  os.makedirs(os.path.dirname(library), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(library)) as tmp:
    for name, text in files.items():
      with open(os.path.join(tmp, name), 'wb') as f:
        f.write(text)
    paths = [os.path.join(tmp, name) for name in _SOURCES]
    out = os.path.join(tmp, 'lib.so')
    subprocess.run([path, *_FLAGS, '-shared', '-fPIC', f'-I{jax.ffi.include_dir()}', *paths,
                    '-o', out], check=True, capture_output=True)
    os.replace(out, library)


def _cpu_identity() -> str:
  """What -march=native builds for: the CPU's model and feature flags (Linux), else its
  architecture. Part of the built kernel's key, so that a cache folder shared by machines of
  different CPUs (a home on a network drive) never hands one a kernel built for another."""
  try:
    with open('/proc/cpuinfo') as f:
      lines = [l for l in f if l.startswith(('model name', 'flags', 'Features'))]
    return ''.join(dict.fromkeys(lines))  # the first processor's lines, once each
  except OSError:
    return platform.machine() + platform.processor()


@functools.cache
def available() -> bool:
  """Whether the CPU kernels (this module's product, `cpu_attention`'s attention) are built,
  building them if need be, and registered with XLA; False, with one logged warning, where
  they cannot be."""
  package = importlib.resources.files('clasp_jax')
  files = {name: package.joinpath(name).read_bytes() for name in _SOURCES + _HEADERS}
  compiler = os.environ.get('CXX', 'c++')
  key = hashlib.sha256('\0'.join([compiler, *_FLAGS, jax.__version__, jax.ffi.include_dir(),
                                   _cpu_identity()]).encode()
                       + b'\0'.join(files.values())).hexdigest()[:16]
  library = os.path.join(build_dir(), f'cpu_kernels-{key}.so')
  try:
    if not os.path.exists(library):
      _compile(compiler, files, library)
    handlers = {symbol: getattr(ctypes.cdll.LoadLibrary(library), symbol) for symbol in TARGETS}
  except (OSError, AttributeError, subprocess.CalledProcessError) as e:
    detail = e.stderr.decode()[-500:] if isinstance(e, subprocess.CalledProcessError) else e
    logging.warning('the CPU kernels could not be built (%s); XLA products instead', detail)
    return False
  if not _registered:  # XLA takes one handler a name a process: the first library loaded
    for symbol, target in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handlers[symbol]), platform='cpu')
    _registered.append(library)
  return True


@contextlib.contextmanager
def use_kernel(on: bool | None) -> Iterator[None]:
  """Products traced inside use the kernel where it applies (True), never (False), or where it
  applies and is available (None, the default outside any such block). A jitted function keeps
  the choice of its first trace: `jax.jit` does not see this setting."""
  token = _USE_KERNEL.set(on)
  try:
    yield
  finally:
    _USE_KERNEL.reset(token)


def applies(x_XK: jax.Array, w_KN: jax.Array) -> bool:
  """Whether `product(x, w)` runs the kernel: on a CPU, float32, `MIN_ROWS` to `MAX_ROWS`
  rows, the kernel wanted and available."""
  on = _USE_KERNEL.get()
  if on is False or xla_options.platform() != 'cpu':
    return False
  rows = x_XK.size // x_XK.shape[-1]
  if x_XK.dtype != jnp.float32 or w_KN.dtype != jnp.float32 or not MIN_ROWS <= rows <= MAX_ROWS:
    return False
  return on or available()  # asked for, `kernel_product` says if it is missing


def product(x_XK: jax.Array, w_KN: jax.Array) -> jax.Array:
  """`x @ w` for x [..., K] and w [K, N]: the kernel where it applies (`applies`), else XLA's
  product."""
  if not applies(x_XK, w_KN):
    return x_XK @ w_KN
  return kernel_product(x_XK, w_KN)


def kernel_product(x_XK: jax.Array, w_KN: jax.Array) -> jax.Array:
  """`x @ w` for float32 x [..., K] and w [K, N] by the kernel, whatever the rows."""
  if not available():
    raise RuntimeError('the CPU product kernel was asked for but could not be built')
  K, N = w_KN.shape
  x_RK = x_XK.reshape(-1, K)
  out_RN = jax.ffi.ffi_call(TARGETS['RowsProduct'],
                            jax.ShapeDtypeStruct((x_RK.shape[0], N), jnp.float32))(x_RK, w_KN)
  return out_RN.reshape(x_XK.shape[:-1] + (N,))
