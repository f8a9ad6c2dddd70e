"""Tensor parallelism over a device mesh: the mesh, one table of sharding rules, placement.

Large models run sharded through JAX's own SPMD machinery: a `jax.sharding.Mesh` with one
axis, 'tp', params and the KV cache placed by the rules below (`NamedSharding`s), and the
compiler partitioning every round piece and inserting the collectives. Megatron-style: each
device holds its own attention heads and its own slice of the MLP width, so a layer needs two
all-reduces (after the output projection and after the down projection) and nothing else;
the residual stream, the hidden states and the decode state's small arrays are replicated.

The rules (`RULES`) name, for every array the engine shards, the logical axis of each
dimension; `mesh_axes` maps the logical axes onto 'tp' for a model and a tensor-parallel size
n (H, KV, F, V: heads, KV heads, MLP width, vocabulary):

  heads      wq, bq columns; wo rows                       split n ways (H % n == 0)
  kv_heads   wk, wv, bk, bv columns; the cache's KV axis   split n ways when KV % n == 0,
                                                           else KV ways (n % KV == 0, below)
  mlp        w_gate, w_up columns; w_down rows             split n ways (F % n == 0)
  vocab      embed rows, lm_head columns                   split n ways when V % n == 0, else
                                                           replicated
  shards     w_qkv, w_gate_up (and b_qkv) shard axis       split n ways (see below)

Norms and everything else are replicated. Stacked layer trees carry a leading, unsharded L
axis; the same rules apply.

Fused projections. The accelerator layout fuses q/k/v and gate/up (`model.fuse_projections`).
Concatenating [wq | wk | wv] and splitting the result's columns n ways would give device 0
all of q and device 1 the keys and values; instead the fused weights carry the shard as an
axis, w_qkv [D, n, (H + 2 KV) / n * hd] with row i = [q_i k_i v_i] (the i-th n-th of each),
and that axis is split: every device multiplies by its own heads' q, k and v in one product,
and `model._qkv` reads q, k and v back per shard. With n = 1 it is plain concatenation, so a
single device computes exactly what it did. With more devices than KV heads a KV head's
keys belong to several shards, so q/k/v stay unfused there (`fuse_qkv`); gate/up always fuse.

GQA with more devices than KV heads (n % KV == 0). The rules then view the mesh as
[KV, n / KV] (`rules_mesh`: axes 'tp' and 'kv_replica', the same devices in the same order):
KV heads split over 'tp', each held (its cache rows, its wk/wv columns) by the n / KV devices
of its row, and everything split n ways splits over both axes. A device's H / n query heads
are then query heads of the one KV head it holds (H / n divides G = H / KV), so attention
stays local and no device keeps KV heads it does not read. Configurations where a device's
query heads would straddle KV heads (neither KV % n nor n % KV is 0) are rejected by `check`.

The vocabulary. The embedding is split by rows (a gather from a vocabulary-split table is a
local masked gather plus one all-reduce of the [T, D] rows), the LM head by columns (logits
come out split by vocabulary; argmax and softmax reduce across devices). A vocabulary that n
does not divide is replicated instead (tests' tiny models).

Exactness. A sharded pass sums the output and down projections' partial products across
devices, in another order than one device's matrix product, so a mesh's tokens may differ from
one device's at near-ties; every pass of a mesh is the same computation, so within a mesh
every drafting method still reproduces plain decoding token for token (engine docstring).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from clasp_jax import attention as attention_lib
from clasp_jax import model as model_lib
from clasp_jax.cache import KVCache, init_cache
from clasp_jax.config import LlamaConfig

#: The tensor-parallel mesh axis.
TP = 'tp'
#: With more devices than KV heads, the rules view the mesh as [KV, n / KV]: KV heads split
#: over TP, each held by the n / KV devices along this axis (`rules_mesh`).
KV_REPLICA = 'kv_replica'

# Logical axes of the rules.
HEADS, KV_HEADS, MLP, VOCAB, SHARDS = 'heads', 'kv_heads', 'mlp', 'vocab', 'shards'

#: The logical axis of each dimension of every sharded array, by leaf name, in the per-layer
#: layout (stacked layer trees add a leading L axis, never sharded). Other leaves are
#: replicated.
RULES: dict[str, tuple[str | None, ...]] = {
    'embed': (VOCAB, None),                    # [V, D]
    'lm_head': (None, VOCAB),                  # [D, V]
    'wq': (None, HEADS),                       # [D, H*hd]
    'bq': (HEADS,),                            # [H*hd]
    'wk': (None, KV_HEADS),                    # [D, KV*hd]
    'wv': (None, KV_HEADS),
    'bk': (KV_HEADS,),                         # [KV*hd]
    'bv': (KV_HEADS,),
    'wo': (HEADS, None),                       # [H*hd, D]
    'w_qkv': (None, SHARDS, None),             # [D, n, (H+2KV)/n*hd]
    'b_qkv': (SHARDS, None),                   # [n, (H+2KV)/n*hd]
    'w_gate': (None, MLP),                     # [D, F]
    'w_up': (None, MLP),
    'w_gate_up': (None, SHARDS, None),         # [D, n, 2F/n]
    'w_down': (MLP, None),                     # [F, D]
    'k_LBSKh': (None, None, None, KV_HEADS, None),  # the cache, [L, B, S, KV, hd]
    'v_LBSKh': (None, None, None, KV_HEADS, None),
}

_DISTRIBUTED_FLAG = 'CLASP_JAX_DISTRIBUTED'


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """The mesh asked for (`--mesh`, `mesh=`), before devices are looked at.

  Attributes:
    tp: devices on the tensor axis; None: every device ('auto').
  """

  tp: int | None = None

  def __str__(self) -> str:
    return 'auto' if self.tp is None else f'tp:{self.tp}'


def parse_mesh(spec: str | MeshSpec | None) -> MeshSpec | None:
  """'tp:N' (N devices on the tensor axis), 'auto' (every device) or None/'' (one device,
  no mesh).

  Raises:
    ValueError: for anything else.
  """
  if spec is None or isinstance(spec, MeshSpec):
    return spec
  text = spec.strip()
  if not text:
    return None
  if text == 'auto':
    return MeshSpec()
  axis, sep, size = text.partition(':')
  if axis != TP or not sep or not size.isdigit() or int(size) < 1:
    raise ValueError(f"mesh must be 'tp:N' (N >= 1 devices on the tensor axis), 'auto' or "
                     f'empty; got {spec!r}')
  return MeshSpec(tp=int(size))


def make_mesh(spec: str | MeshSpec | Mesh | None,
              devices: Sequence[jax.Device] | None = None) -> Mesh | None:
  """The `Mesh` of a spec (see `parse_mesh`; a `Mesh` is returned as is), over the first N
  of `devices` (default: every device of the job, all hosts' under `jax.distributed`).

  Raises:
    ValueError: for a bad spec, or more devices than there are.
  """
  if isinstance(spec, Mesh):
    return spec
  spec = parse_mesh(spec)
  if spec is None:
    return None
  devices = list(jax.devices() if devices is None else devices)
  size = len(devices) if spec.tp is None else spec.tp
  if size > len(devices):
    raise ValueError(f'mesh {spec} needs {size} devices; {len(devices)} available')
  return Mesh(np.array(devices[:size]), (TP,))


def tp_size(mesh: Mesh | None) -> int:
  """n, the devices on the tensor axis (1 without a mesh)."""
  return 1 if mesh is None else mesh.shape[TP]


def check(config: LlamaConfig, mesh: Mesh | None) -> None:
  """Raises ValueError (one line) when the model cannot be split over the mesh."""
  n = tp_size(mesh)
  if mesh is not None and tuple(mesh.axis_names) != (TP,):
    raise ValueError(f"the mesh must have one axis, 'tp'; got axes {tuple(mesh.axis_names)}")
  if config.num_heads % n:
    raise ValueError(f'num_heads ({config.num_heads}) must be divisible by the tensor-parallel '
                     f'size ({n})')
  if config.num_kv_heads % n and n % config.num_kv_heads:
    raise ValueError(f'num_kv_heads ({config.num_kv_heads}) and the tensor-parallel size ({n}) '
                     'must divide one another (KV heads are split or replicated whole)')
  if config.intermediate_size % n:
    raise ValueError(f'intermediate_size ({config.intermediate_size}) must be divisible by the '
                     f'tensor-parallel size ({n})')


def fuse_qkv(config: LlamaConfig, n: int) -> bool:
  """Whether q/k/v fuse per shard for n devices: only when the KV heads split n ways."""
  return config.num_kv_heads % n == 0


def rules_mesh(config: LlamaConfig, mesh: Mesh) -> Mesh:
  """The mesh the rules place arrays on: `mesh` itself, or, with more devices than KV heads,
  its devices viewed as [KV, n / KV] with axes (TP, KV_REPLICA), in the same order."""
  n, kv = tp_size(mesh), config.num_kv_heads
  if kv % n == 0:
    return mesh
  return Mesh(mesh.devices.reshape(kv, n // kv), (TP, KV_REPLICA))


def mesh_axes(config: LlamaConfig, n: int) -> dict[str, Any]:
  """Logical axis -> axes of `rules_mesh` (None: replicated) for this model over n devices."""
  every = TP if config.num_kv_heads % n == 0 else (TP, KV_REPLICA)
  return {HEADS: every, MLP: every, SHARDS: every, KV_HEADS: TP,
          VOCAB: every if config.vocab_size % n == 0 else None}


def _leaf_name(path) -> str | None:
  last = path[-1] if path else None
  name = getattr(last, 'key', getattr(last, 'name', None))
  return name if isinstance(name, str) else None


def partition_spec(name: str | None, ndim: int, config: LlamaConfig, n: int) -> PartitionSpec:
  """The rules' PartitionSpec of a leaf called `name` with `ndim` dimensions.

  Raises:
    ValueError: a ruled leaf whose rank fits neither layout.
  """
  rule = RULES.get(name)
  if rule is None:
    return PartitionSpec()
  if ndim not in (len(rule), len(rule) + 1):
    raise ValueError(f'{name} has {ndim} dimensions; the sharding rules expect {len(rule)} '
                     f'(per layer) or {len(rule) + 1} (stacked)')
  axes = mesh_axes(config, n)
  return PartitionSpec(*(None,) * (ndim - len(rule)), *(axes.get(a) for a in rule))


def tree_specs(tree: Any, config: LlamaConfig, n: int) -> Any:
  """The PartitionSpec of every leaf of a pytree (params, a cache, a decode state, a function's
  arguments): the rules by leaf name, replicated otherwise. Needs shapes only."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: partition_spec(_leaf_name(path), np.ndim(x), config, n), tree)


def tree_shardings(tree: Any, config: LlamaConfig, mesh: Mesh) -> Any:
  """`tree_specs` as `NamedSharding`s on `mesh` (on `rules_mesh`, its view)."""
  view = rules_mesh(config, mesh)
  return jax.tree.map(lambda spec: NamedSharding(view, spec),
                      tree_specs(tree, config, tp_size(mesh)),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def jit_placed(fn, config: LlamaConfig, mesh: Mesh | None, *args):
  """`fn` jitted so that its outputs are made where the rules put them on `mesh` (on the
  default device without a mesh); `args` (abstract or concrete) give the outputs' shapes."""
  if mesh is None:
    return jax.jit(fn)
  return jax.jit(fn, out_shardings=tree_shardings(jax.eval_shape(fn, *args), config, mesh))


def put(tree: Any, config: LlamaConfig, mesh: Mesh | None) -> Any:
  """Host or device arrays on the mesh by the rules (the default device without a mesh).

  Host arrays go to each device as its own slice (`make_array_from_callback`): no device
  ever receives a whole tensor that the rules split; device arrays are resharded (no-op when
  already in place). Only transfers: no program is compiled (nor loaded from a cache), which a
  GPU process pays for at start-up, once per array shape.
  """
  if mesh is None:
    return jax.device_put(tree)

  def one(x, sharding):
    if isinstance(x, jax.Array):
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(one, tree, tree_shardings(tree, config, mesh))


def place_params(params: model_lib.Params, config: LlamaConfig, mesh: Mesh | None = None, *,
                 per_layer: bool = False) -> model_lib.Params:
  """Params (host numpy or jax arrays) on the mesh by the rules, in the layout asked for.

  Args:
    params: stacked (as loaders build them) or per layer (`model.unstack_layers`).
    config: the model config.
    mesh: the mesh; None: the default device.
    per_layer: turn stacked params into the accelerator layout (per-layer trees, projections
      fused per shard), one layer at a time: each layer is placed by the rules, then fused on
      the devices, so host params never reach a device whole, and device params cost one
      layer of extra memory besides the stacked copy.

  Raises:
    ValueError: the model does not split over the mesh, or per-layer params were fused for
      another tensor-parallel size.
  """
  check(config, mesh)
  n = tp_size(mesh)
  if model_lib.is_per_layer(params):
    for lp in params['layers']:
      shards = lp['w_gate_up'].shape[1] if 'w_gate_up' in lp else n
      if shards != n:
        raise ValueError(f'the per-layer params are fused for {shards} devices, the mesh has {n}:'
                         ' place stacked params (or load with this mesh)')
    return put(params, config, mesh)
  if not per_layer:
    return put(params, config, mesh)
  fuse = functools.partial(model_lib.fuse_projections, num_shards=n,
                           fuse_qkv=fuse_qkv(config, n))
  stacked = params['layers']
  fuse = jit_placed(fuse, config, mesh, {k: w[0] for k, w in stacked.items()})
  layers = tuple(fuse(put({k: w[i] for k, w in stacked.items()}, config, mesh))
                 for i in range(model_lib.num_layers_in(params)))
  top = put({k: w for k, w in params.items() if k != 'layers'}, config, mesh)
  return dict(top, layers=layers)


@functools.lru_cache(maxsize=16)
def cache_program(config: LlamaConfig, max_len: int, dtype: Any, mesh: Mesh | None):
  """The compiled program that makes an empty cache (`cache.init_cache`) of `max_len`
  positions on the devices in its sharding: one program rather than one per array, each of
  which a new process would load; compiled once per capacity and kept, so that a decoder can
  compile it before its first generation. Call it with no arguments for the cache."""
  make = functools.partial(init_cache, config, max_len, dtype=jnp.dtype(dtype))
  return jit_placed(make, config, mesh).lower().compile()


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the engine's arrays live on a mesh: the rules applied to any pytree.

  Attributes:
    config: the model config.
    mesh: the mesh.
  """

  config: LlamaConfig
  mesh: Mesh

  def shardings(self, tree: Any) -> Any:
    return tree_shardings(tree, self.config, self.mesh)

  def abstract(self, tree: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of a pytree's leaves (arrays or abstract), with their shardings:
    what a function is compiled for ahead of time."""
    def struct(x, sharding):
      dtype = x.dtype if hasattr(x, 'dtype') else np.result_type(x)
      return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sharding)
    return jax.tree.map(struct, tree, self.shardings(tree))

  def constrain(self, tree: Any) -> Any:
    """A traced pytree constrained to the rules' shardings."""
    return jax.lax.with_sharding_constraint(tree, self.shardings(tree))

  def pin(self, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with its outputs constrained to the rules' shardings, so that a donated decode
    state comes back exactly as it went in, segment after segment."""
    return lambda *args: self.constrain(fn(*args))


def shard_attention(attention: model_lib.Attention, config: LlamaConfig, mesh: Mesh, *,
                    kernel: bool = False) -> model_lib.Attention:
  """The cache attention on a mesh, each device attending with its own query heads to the KV
  heads it holds (by the rules, those its query heads read).

  A single-device kernel (`kernel`: the Pallas GPU kernel), which the compiler cannot
  partition, runs per device on its own heads (`jax.shard_map`; heads are independent, no
  collective). The `jnp` attention is partitioned by the compiler, its inputs pinned to the
  rules' shardings so that it keeps to them. Keywords (`num_rows`) reach `attention` as they
  came.
  """
  n = tp_size(mesh)
  view = rules_mesh(config, mesh)
  axes = mesh_axes(config, n)
  heads = PartitionSpec(None, None, axes[HEADS], None)
  kv = PartitionSpec(None, None, axes[KV_HEADS], None)
  # A packed q/k/v [B, T, n, N/n, hd] (fused per shard: KV heads split, `fuse_qkv`): shard i
  # holds device i's q, k and v heads.
  packed = PartitionSpec(None, None, axes[SHARDS], None, None)
  cache = partition_spec('k_LBSKh', 5, config, n)
  scalar = PartitionSpec()
  if kernel:
    out = PartitionSpec(None, None, axes[HEADS])

    def mapped(q, k, v, cache_k, cache_v, layer, start, riders=None, **rows):
      def local(q, k, v, cache_k, cache_v, layer, start, pos):
        ride = () if riders is None else (attention_lib.Riders(riders.first_row, pos),)
        return attention(q, k, v, cache_k, cache_v, layer, start, *ride, **rows)

      # The riders' position, a replicated scalar (unread without riders); their row static.
      scalars = (jnp.asarray(layer, jnp.int32), jnp.asarray(start, jnp.int32),
                 jnp.asarray(0 if riders is None else riders.pos, jnp.int32))
      if k is None:
        return jax.shard_map(lambda qkv, *rest: local(qkv, None, None, *rest), mesh=view,
                             out_specs=out, check_vma=False,
                             in_specs=(packed, cache, cache) + (scalar,) * 3
                             )(q, cache_k, cache_v, *scalars)
      return jax.shard_map(local, mesh=view, out_specs=out, check_vma=False,
                           in_specs=(heads, kv, kv, cache, cache) + (scalar,) * 3
                           )(q, k, v, cache_k, cache_v, *scalars)

    return mapped

  def constrained(q_BTHh, k_BTKh, v_BTKh, cache_k_LBSKh, cache_v_LBSKh, layer, start,
                  riders=None, **rows):
    pin = lambda x, spec: jax.lax.with_sharding_constraint(x, NamedSharding(view, spec))
    ride = () if riders is None else (riders,)  # the DP's prefix attention takes none
    if k_BTKh is None:
      q_BTHh = pin(q_BTHh, packed)
    else:
      q_BTHh, k_BTKh, v_BTKh = pin(q_BTHh, heads), pin(k_BTKh, kv), pin(v_BTKh, kv)
    return attention(q_BTHh, k_BTKh, v_BTKh, pin(cache_k_LBSKh, cache),
                     pin(cache_v_LBSKh, cache), layer, start, *ride, **rows)

  return constrained


def distributed_requested(environ: Mapping[str, str]) -> bool:
  """Whether the environment describes a job of several processes: a JAX coordinator
  address, a SLURM or Open MPI job of several tasks, a TPU slice of several hosts, or
  CLASP_JAX_DISTRIBUTED=1."""
  if environ.get(_DISTRIBUTED_FLAG) == '1' or environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  for count in (environ.get('SLURM_NTASKS', ''), environ.get('OMPI_COMM_WORLD_SIZE', '')):
    if count.isdigit() and int(count) > 1:
      return True
  return len([h for h in environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
  """Joins a multi-process job (`jax.distributed.initialize`, which reads the cluster's
  settings itself) when the environment describes one; must run before anything touches a
  device. Returns whether it did."""
  if not distributed_requested(os.environ if environ is None else environ):
    return False
  if not jax.distributed.is_initialized():
    jax.distributed.initialize()
  return True
