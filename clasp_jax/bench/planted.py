"""Benchmark models with planted layer redundancy, and how diverse their text is.

Real checkpoints at the 8B and 70B shapes are not available to every run, and the one real
model this project runs everywhere (SmolLM2-135M) is too small for a layer-skip draft to pay.
A `PlantedModel` is a preset's shape with random weights in which a known set of layers is made
nearly redundant: their attention-output and MLP-down projections are scaled by epsilon, so
skipping them moves the hidden state by an amount epsilon controls (nothing at all at 0), and
drafts are accepted at a rate epsilon controls. What CLaSp does on it can then be measured end
to end, against a known answer: the skip set it should find.

Random weights by themselves write degenerate text (one token repeated, or a loop of a few),
and on such text every drafter looks perfect. The weights here are scaled so that the text
stays diverse and the drafts have to be earned:

- **Untied LM head** (`planted_model` unties it). With tied embeddings the logits are the
  hidden state's dot products with the embeddings, and the hidden state still holds the
  current token's embedding, so the head copies the input token forever.
- **Depth-normalised layer gains.** Every layer's output projections are drawn so that the L
  layers together add `attn_gain` (attention) and `mlp_gain` (MLP) times the embedding's RMS
  to the residual stream, each layer 1/sqrt(L) of it. The balance between the current token,
  the context and the layers is then the same at 16 layers as at 80: with a fixed per-layer
  scale, the deep models' residual stream fills with slowly varying context averages and the
  text falls into loops (measured at D = 256, 96 greedy tokens from random prompts: distinct
  tokens 0.95 at L = 16 but 0.52-0.69 at L = 80 with a per-layer gain of 1; 0.73-0.98 at L = 16,
  32 and 80 with the depth-normalised gains, where skipping the planted half gives tau 6.9-7.0
  at epsilon 0, 4.0-5.3 at 0.05 and 1.5-1.9 at 0.2).
- **Attention that matters.** Queries and keys are drawn so that attention scores have a
  standard deviation of about `qk_gain`^2: attention spreads over the context rather than
  locking onto one token, and the context moves every prediction (zeroing every attention
  output changes 90-98% of the full model's greedy tokens on these models' own text). A draft
  therefore has to get the context right, not just the current token.
- **Confident logits.** The LM head is drawn so that the logits have a standard deviation of
  `logit_std`: the full model's top-1 probability exceeds the draft-exit threshold 0.7 at
  88-96% of positions. On a random model confidence is independent from position to
  position, so the tau of real drafts (the CLaSp paper's 3.7-7.2) needs drafts that are rarely
  stopped; real text instead has runs of near-certain tokens (SmolLM2-135M's answers pass 0.7
  at 49% of positions). Nor does confidence say whether a draft is right: the threshold stops
  drafts at random, about one in ten, and a rejected chain runs on (about 6 drafts per round
  at any tau), where on a real model it tends to stop. Drafting here wastes more draft steps
  than on a real model of the same tau.

Every weight is generated one layer at a time, straight into its buffer of the requested
dtype, so that the 70B shape (141 GB in bfloat16) can be built on one accelerator without a
second copy of the stack, in the per-layer, projection-fused layout the accelerator path runs
(`per_layer=True`, see `model.unstack_layers`); on a tensor-parallel mesh each weight is
generated straight into its shards. The stacked layout (`per_layer=False`, for the CPU
reference path) holds the same values. The random bits come from XLA's RngBitGenerator
('rbg' keys): compiled for the CPU, XLA's memory analysis of the 70B layer and LM head
generators shows no temporary buffers, where JAX's default threefry bits needed up to 8x the
weight's size; compiled for an H200 it shows 1.4 GB (a layer) and 4.2 GB (the head), which
fit. The draws are unbiased (`_normal`): JAX's own bfloat16 normals are not, and on bfloat16
weights their bias alone made the text degenerate at large widths.

`diversity` measures a text's diversity from its token ids; a `Diversity` that is `degenerate`
marks a benchmark point whose figures must not be quoted.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax import model as model_lib
from clasp_jax import sharding
from clasp_jax.config import LlamaConfig
from clasp_jax.configs import models
from clasp_jax.model import Params

#: Share of the layers that is planted by default: M = L / 2 is where CLaSp's best M lies on
#: large models (44 of 80 on LLaMA-3-70B), so the fixed-M runs at 0.4 L and 0.5 L can skip
#: planted layers only.
DEFAULT_PLANTED_FRACTION = 0.5


def choose_planted(num_layers: int, fraction: float = DEFAULT_PLANTED_FRACTION,
                   seed: int = 0) -> tuple[int, ...]:
  """round(fraction * L) layers drawn at random (seeded) among the inner layers [1, L - 2].

  The first and last layers are never planted: on real models they are the least redundant
  ones (ConfLayers never skips them), and a skip set that must leave them is what a search
  on a real model finds too. The set is random rather than evenly spread so that a DP that
  merely spreads its skips evenly, or a static evenly spread set, does not find it by
  construction.

  Raises:
    ValueError: for a fraction outside [0, 1] or more planted layers than inner layers.
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'the planted fraction must be in [0, 1], got {fraction}')
  inner = np.arange(1, num_layers - 1)
  count = round(fraction * num_layers)
  if count > len(inner):
    raise ValueError(f'cannot plant {count} of {num_layers} layers: only {len(inner)} are '
                     f'inner layers')
  chosen = np.random.default_rng(seed).choice(inner, count, replace=False)
  return tuple(sorted(int(i) for i in chosen))


@dataclasses.dataclass(frozen=True)
class PlantedModel:
  """A random model whose `planted` layers are nearly identities.

  Attributes:
    config: the model's shape (an untied head unless deliberately tied: see the module
      docstring).
    planted: the indices of the near-redundant layers.
    epsilon: the factor on the planted layers' attention-output (wo) and MLP-down (w_down)
      projections: 0 makes them exact identities, 1 plants nothing.
    seed: the PRNG seed of every weight.
    embed_std: standard deviation of the embedding entries (the residual stream's scale).
    qk_gain: query and key scale: attention scores have a standard deviation of about
      qk_gain^2.
    attn_gain: what the L attention outputs together add to the residual stream, in units of
      `embed_std` (each layer gets 1/sqrt(L) of it).
    mlp_gain: the same for the MLP outputs.
    logit_std: standard deviation of the logits (how confident the model is).
  """

  config: LlamaConfig
  planted: tuple[int, ...]
  epsilon: float
  seed: int = 0
  embed_std: float = 1.0
  qk_gain: float = 1.0
  attn_gain: float = 4.0
  mlp_gain: float = 4.0
  logit_std: float = 40.0

  def __post_init__(self):
    L = self.config.num_layers
    if not all(0 <= i < L for i in self.planted) or len(set(self.planted)) != len(self.planted):
      raise ValueError(f'planted layers must be distinct indices in [0, {L}), got '
                       f'{self.planted}')
    if self.epsilon < 0:
      raise ValueError(f'epsilon must be >= 0, got {self.epsilon}')

  @property
  def layer_factors(self) -> np.ndarray:
    """float32[L]: epsilon for the planted layers, 1 for the others."""
    factors = np.ones((self.config.num_layers,), np.float32)
    factors[list(self.planted)] = self.epsilon
    return factors

  def skip_precision_recall(self, skip_L) -> tuple[float, float]:
    """(precision, recall) of a skip set bool[L] against the planted set."""
    skipped = set(np.flatnonzero(np.asarray(skip_L)).tolist())
    hits = len(skipped & set(self.planted))
    return (hits / len(skipped) if skipped else 0.0,
            hits / len(self.planted) if self.planted else 0.0)


def planted_model(model: str | LlamaConfig, *, epsilon: float,
                  fraction: float = DEFAULT_PLANTED_FRACTION, seed: int = 0,
                  **knobs) -> PlantedModel:
  """A `PlantedModel` of a preset (`configs.models.PRESETS`) or config, its head untied.

  Args:
    model: a preset name or a config.
    epsilon: see `PlantedModel`.
    fraction: the share of the layers planted (`choose_planted`).
    seed: the PRNG seed of the planted set and of the weights.
    **knobs: other `PlantedModel` fields (embed_std, qk_gain, ...).

  Raises:
    ValueError: for an unknown preset or settings that do not fit the shape.
  """
  if isinstance(model, str):
    if model not in models.PRESETS:
      raise ValueError(f'unknown preset {model!r}; known: {", ".join(models.PRESETS)}')
    model = models.PRESETS[model]()
  config = dataclasses.replace(model, tie_embeddings=False)
  return PlantedModel(config=config, planted=choose_planted(config.num_layers, fraction, seed),
                      epsilon=epsilon, seed=seed, **knobs)


def _normal(key: jax.Array, shape: tuple[int, ...], std, dtype) -> jax.Array:
  """normal(0, std^2) in `dtype`; `std` may be a traced scalar or a per-column vector.

  The random bits have the weight's own width (no wider temporaries than JAX's own draws)
  and map to a grid symmetric about 0.5 (at most 24 bits, exact in float32) before erfinv,
  so that the draws have mean 0. JAX's own bfloat16 normals do not: their 128 uniform values
  are not symmetric, and their mean of -0.012 std, shared by every weight and summed
  coherently by every D-wide product, made every prompt write the same token at the 70B
  width (`docs/results/h200/planted_unbiased/`).
  """
  dtype = jnp.dtype(dtype)
  width = 8 * dtype.itemsize
  kept = min(width, 24)
  # Every array below has the weight's shape.
  bits = jax.random.bits(key, shape, jnp.dtype(f'uint{width}'))
  uniform = ((bits >> (width - kept)).astype(jnp.float32) + 0.5) / 2 ** kept  # in (0, 1)
  return (math.sqrt(2) * jax.lax.erf_inv(2 * uniform - 1) * std).astype(dtype)


def _top(k_embed: jax.Array, k_head: jax.Array, weights: PlantedModel, dtype) -> Params:
  """The params besides the layers: embedding, final norm and the LM head (if untied)."""
  c = weights.config
  D, V = c.hidden_size, c.vocab_size
  params = dict(embed=_normal(k_embed, (V, D), weights.embed_std, dtype),
                final_norm=jnp.ones((D,), dtype))
  if not c.tie_embeddings:
    # Unit-RMS final states: logits ~ normal(0, logit_std^2).
    params['lm_head'] = _normal(k_head, (D, V), weights.logit_std / math.sqrt(D), dtype)
  return params


def _layer(key: jax.Array, factor: jax.Array, spec: PlantedModel, dtype,
           fused: bool) -> Params:
  """One layer's params; `factor` scales its output projections (epsilon when planted).

  q/k/v and gate/up are drawn as the fused matrices the accelerator path runs, each in one
  piece (a concatenation of separately drawn parts would need their size again in
  temporaries); the stacked layout takes their column blocks.
  """
  c = spec.config
  D, F, L = c.hidden_size, c.intermediate_size, c.num_layers
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  k_qkv, k_o, k_gate_up, k_down = jax.random.split(key, 4)
  # Inputs are RMS-normed (unit RMS): q and k entries ~ qk_gain, v and MLP pre-activations ~ 1.
  qkv_std = jnp.concatenate([jnp.full((q + kv,), spec.qk_gain / math.sqrt(D)),
                             jnp.full((kv,), 1 / math.sqrt(D))])
  lp = dict(
      attn_norm=jnp.ones((D,), dtype), mlp_norm=jnp.ones((D,), dtype),
      w_qkv=_normal(k_qkv, (D, q + 2 * kv), qkv_std, dtype),
      wo=_normal(k_o, (q, D), spec.embed_std * spec.attn_gain / math.sqrt(q * L) * factor,
                 dtype),
      w_gate_up=_normal(k_gate_up, (D, 2 * F), 1 / math.sqrt(D), dtype),
      w_down=_normal(k_down, (F, D), spec.embed_std * spec.mlp_gain / math.sqrt(F * L) * factor,
                     dtype))
  if fused:
    return lp
  w_qkv, w_gate_up = lp.pop('w_qkv'), lp.pop('w_gate_up')
  return dict(lp, wq=w_qkv[:, :q], wk=w_qkv[:, q:q + kv], wv=w_qkv[:, q + kv:],
              w_gate=w_gate_up[:, :F], w_up=w_gate_up[:, F:])


# Compiled once per shape and knobs: epsilon and the planted set enter as traced factors, and
# the spec they take has them cleared (see `build_params`). The stack is built layer after layer
# (`lax.map`), each layer drawn exactly as `_one_layer` draws it.
_one_layer = jax.jit(functools.partial(_layer, fused=True), static_argnums=(2, 3))
_one_top = jax.jit(_top, static_argnums=(2, 3))
# The fused matrices as `model.fuse_projections` lays them out for one tensor-parallel shard,
# [D, 1, X]: a reshape in place (the drawn layer is donated), so no weight exists twice.
_one_shard = jax.jit(lambda lp: dict(lp, w_qkv=lp['w_qkv'][:, None],
                                     w_gate_up=lp['w_gate_up'][:, None]), donate_argnums=0)
_stacked_layers = jax.jit(
    lambda keys_L, factors_L, spec, dtype: jax.lax.map(
        lambda kf: _layer(kf[0], kf[1], spec, dtype, fused=False), (keys_L, factors_L)),
    static_argnums=(2, 3))


@functools.lru_cache(maxsize=8)
def _on_mesh(weights: PlantedModel, dtype, mesh) -> tuple:
  """(layer, top): jitted generators of one layer (per-shard fused for the mesh, as
  `model.fuse_projections` lays it out) and of the embedding, final norm and LM head, each
  writing its output straight into the places the sharding rules give it on `mesh`."""
  c = weights.config
  n = sharding.tp_size(mesh)

  def layer(key, factor):
    return model_lib.fuse_projections(_layer(key, factor, weights, dtype, fused=False), n,
                                      sharding.fuse_qkv(c, n))

  top = functools.partial(_top, weights=weights, dtype=dtype)
  key = jax.eval_shape(lambda: jax.random.key(0, impl='rbg'))
  factor = jax.ShapeDtypeStruct((), jnp.float32)
  return (sharding.jit_placed(layer, c, mesh, key, factor),
          sharding.jit_placed(top, c, mesh, key, key))


def build_params(spec: PlantedModel, dtype=jnp.float32, per_layer: bool = False,
                 mesh: jax.sharding.Mesh | None = None) -> Params:
  """The planted model's params, generated one weight at a time.

  Args:
    spec: the model.
    dtype: the params' dtype; every weight is drawn in it directly.
    per_layer: False: the stacked layout of `clasp_jax.weights` (the CPU reference path).
      True: a tuple of per-layer trees with q/k/v fused into 'w_qkv' and gate/up into
      'w_gate_up', the layout `model.unstack_layers` gives and the accelerator path runs; the
      stack never exists, so the largest shapes need only their own size in memory.
    mesh: a tensor-parallel mesh (`sharding.make_mesh`) to build the per-layer params on, each
      weight generated straight into the places the sharding rules give it (projections
      fused per shard), so no device holds more than its share; None: the default device.

  Returns:
    The params pytree; both layouts hold the same values, and so does a mesh wherever XLA's
    RngBitGenerator draws the same bits sharded as whole (on the CPU it does:
    `tests/multidevice_sharding.py`; not checked on GPUs).

  Raises:
    ValueError: a mesh without `per_layer`, or one the model does not split over.
  """
  if mesh is not None:
    if not per_layer:
      raise ValueError('planted params are built on a mesh in the per-layer layout only')
    sharding.check(spec.config, mesh)
  L = spec.config.num_layers
  dtype = jnp.dtype(dtype)
  # XLA's RngBitGenerator writes the random bits straight into each weight; threefry (JAX's
  # default) needs temporaries of several times the weight's size (8x for the 70B LM head).
  k_embed, k_head, k_layers = jax.random.split(jax.random.key(spec.seed, impl='rbg'), 3)
  keys_L = jax.random.split(k_layers, L)
  factors_L = jnp.asarray(spec.layer_factors)
  weights = dataclasses.replace(spec, planted=(), epsilon=1.0)  # all that shapes the weights
  if mesh is not None:
    layer, top = _on_mesh(weights, dtype, mesh)
    return dict(top(k_embed, k_head),
                layers=tuple(layer(keys_L[i], factors_L[i]) for i in range(L)))
  params = _one_top(k_embed, k_head, weights, dtype)
  if per_layer:
    params['layers'] = tuple(_one_shard(_one_layer(keys_L[i], factors_L[i], weights, dtype))
                             for i in range(L))
  else:
    params['layers'] = _stacked_layers(keys_L, factors_L, weights, dtype)
  return params


# A text is degenerate (`Diversity.degenerate`) past any of these. Calibrated on SmolLM2-135M's
# greedy Spec-Bench answers (the first 96 tokens of 28 answers, docs/results/cpu/specbench_128):
# distinct-token ratios 0.26-0.75, and exactly the four that loop ("a being that exists beyond
# the boundaries of the physical realm, a being that exists ...") pass one of the limits below,
# while degenerate random models repeat 1-5 tokens (ratio 0.01-0.05).
MIN_DISTINCT_RATIO = 0.25
MAX_LAG_MATCH = 0.5
MAX_REPEAT_RATIO = 0.5
MAX_LAG = 16


@dataclasses.dataclass(frozen=True)
class Diversity:
  """How diverse one text (token ids) is.

  Attributes:
    num_tokens: the text's length n.
    distinct_ratio: distinct tokens / n.
    distinct_3gram_ratio: distinct 3-grams / (n - 2).
    longest_repeat: the length of the longest token span that occurs twice (overlaps allowed:
      a loop of period p over the whole text gives n - p).
    lag_match: the largest fraction, over lags k in [1, MAX_LAG], of positions whose token
      equals the one k back (1.0 for a loop of period k).
    lag: the k of `lag_match`.
  """

  num_tokens: int
  distinct_ratio: float
  distinct_3gram_ratio: float
  longest_repeat: int
  lag_match: float
  lag: int

  @property
  def reasons(self) -> list[str]:
    """Why the text is degenerate (empty when it is not)."""
    reasons = []
    if self.distinct_ratio < MIN_DISTINCT_RATIO:
      reasons.append(f'distinct tokens {self.distinct_ratio:.2f} < {MIN_DISTINCT_RATIO}')
    if self.lag_match > MAX_LAG_MATCH:
      reasons.append(f'{self.lag_match:.2f} of tokens equal the one {self.lag} back')
    if self.longest_repeat > MAX_REPEAT_RATIO * self.num_tokens:
      reasons.append(f'a span of {self.longest_repeat} of {self.num_tokens} tokens repeats')
    return reasons

  @property
  def degenerate(self) -> bool:
    """Whether the text loops or repeats too much for its drafting figures to mean anything."""
    return bool(self.reasons)


def _longest_repeat(tokens_N: np.ndarray) -> int:
  """The longest run of equal tokens between the text and itself shifted by d, over all d."""
  best = 0
  for d in range(1, len(tokens_N)):
    same = np.concatenate([[0], (tokens_N[d:] == tokens_N[:-d]).astype(np.int8), [0]])
    edges = np.diff(same)
    if edges.any():
      best = max(best, int((np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).max()))
  return best


def diversity(token_ids) -> Diversity:
  """The `Diversity` of a text given as token ids (at least one)."""
  tokens_N = np.asarray(token_ids)
  n = len(tokens_N)
  if not n:
    raise ValueError('diversity of an empty text')
  trigrams = {tuple(tokens_N[i:i + 3]) for i in range(n - 2)}
  lags = {k: float(np.mean(tokens_N[k:] == tokens_N[:-k]))
          for k in range(1, min(MAX_LAG, n - 1) + 1)}
  lag = max(lags, key=lags.get) if lags else 1
  return Diversity(num_tokens=n, distinct_ratio=len(set(tokens_N.tolist())) / n,
                   distinct_3gram_ratio=len(trigrams) / max(n - 2, 1),
                   longest_repeat=_longest_repeat(tokens_N), lag_match=lags.get(lag, 0.0),
                   lag=lag)
