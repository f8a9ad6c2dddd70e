"""The functional LLaMA against transformers' LlamaForCausalLM, and its cache and skip paths.

Reference numerics: PyTorch on CPU in float32, against our float32 params. The tiny random HF
checkpoint exercises GQA and LLaMA-3 RoPE scaling; the embedded SmolLM2-135M GGUF is the real
model every other test decodes with.
"""

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from clasp_jax import cpu_product
from clasp_jax import model as model_lib
from clasp_jax import strategies
from clasp_jax import weights
from clasp_jax.bench.specbench import group_of
from clasp_jax.bench.specbench import load_questions
from clasp_jax.cache import init_cache
from clasp_jax.engine import Decoder
from clasp_jax.generation import encode_prompt
import tiny

pytestmark = pytest.mark.slow  # minutes in all on 2 cores: started first (conftest.py)

# The first question of three groups whose chat-templated prompts are short (qa, ~40 tokens),
# medium (mt_bench, ~50) and long (summarization, ~770): chosen by length, not by outcome.
PARITY_GROUPS = ('qa', 'mt_bench', 'summarization')
NUM_GREEDY = 32


@functools.partial(jax.jit, static_argnames=('config',))
def _forward(params, config, tokens_BT, cache, skip_L=None, out_idx_BP=None):
  return model_lib.forward(params, config, tokens_BT, cache, skip_L=skip_L,
                           out_idx_BP=out_idx_BP)


@pytest.fixture(scope='module', autouse=True)
def _one_torch_thread():
  """Runs PyTorch on one thread while this module's tests run.

  On a small shared CPU, PyTorch's spinning OpenMP workers and XLA's thread pool starve each
  other: transformers' `generate` measured 110 s with 2 threads against 3.5 s with 1 for the
  same 64 tokens. The thread count may change PyTorch's float32 summation order, which the
  logit tolerances cover as they cover XLA's."""
  previous = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _float32_products():
  """Float32 products at full precision, as transformers computes them: a GPU multiplies
  float32 through TF32 by default (logits off by ~4e-4 on the tiny model). `Decoder` asks for
  this precision itself for float32 weights; these tests call the model directly."""
  with jax.default_matmul_precision('highest'):
    yield


def _full_logits(params, config, tokens_BT):
  """One forward over every token from an empty cache."""
  tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
  cache = init_cache(config, tokens_BT.shape[1], batch=tokens_BT.shape[0])
  return _forward(params, config, tokens_BT, cache)


def _without_eos(config):
  return dataclasses.replace(config, eos_token_ids=())


def _hf_logits(hf_model, tokens_BT) -> np.ndarray:
  with torch.inference_mode():
    return hf_model(torch.tensor(np.asarray(tokens_BT))).logits.numpy()


def _hf_greedy(hf_model, prompt_ids, max_new_tokens) -> list[int]:
  """transformers' greedy `generate` with EOS disabled, so exactly max_new_tokens come back."""
  generation_config = transformers.GenerationConfig(
      do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
  input_ids = torch.tensor([prompt_ids])
  with torch.inference_mode():
    out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                            generation_config=generation_config)
  tokens = out[0, len(prompt_ids):].tolist()
  assert len(tokens) == max_new_tokens
  return tokens


def _max_abs_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------------------------
# (a) The tiny random HF checkpoint (GQA, LLaMA-3 RoPE scaling, untied head).


@pytest.fixture(scope='module')
def tiny_pair(tiny_hf_checkpoint):
  """(our LoadedModel, transformers' float32 model) of the same tiny checkpoint."""
  ours = weights.load(tiny_hf_checkpoint, dtype='float32')
  hf_model = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_checkpoint,
                                                           dtype=torch.float32).eval()
  return ours, hf_model


def test_tiny_logits_match_transformers(tiny_pair):
  """Every position's logits of a 100-token random sequence agree with transformers to 1e-4."""
  ours, hf_model = tiny_pair
  tokens_BT = np.random.RandomState(0).randint(0, ours.config.vocab_size, (1, 100))

  logits_BTV = _full_logits(ours.params, ours.config, tokens_BT).logits_BPV
  expected_BTV = _hf_logits(hf_model, tokens_BT)

  chex.assert_shape(logits_BTV, (1, 100, ours.config.vocab_size))
  gap = _max_abs_diff(logits_BTV, expected_BTV)
  assert gap < 1e-4, f'max |dlogit| = {gap:.3g} (logit scale {np.abs(expected_BTV).max():.3g})'


def test_tiny_greedy_matches_transformers_generate(tiny_pair):
  """NUM_GREEDY greedy tokens of our Decoder equal transformers' `generate` on 3 random prompts."""
  ours, hf_model = tiny_pair
  rng = np.random.RandomState(1)
  decoder = Decoder(ours.params, _without_eos(ours.config), strategies.Vanilla())
  for length in (7, 31, 100):
    prompt = rng.randint(0, ours.config.vocab_size, length).tolist()
    expected = _hf_greedy(hf_model, prompt, NUM_GREEDY)
    assert decoder.generate(prompt, NUM_GREEDY).token_ids == expected, f'prompt length {length}'


# ---------------------------------------------------------------------------------------------
# (b) The real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32 on both sides).


@pytest.fixture(scope='module')
def hf_smollm2(smollm2_folder_and_name):
  """transformers' float32 SmolLM2, dequantised from the same GGUF (loaded once: seconds)."""
  folder, name = smollm2_folder_and_name
  return transformers.LlamaForCausalLM.from_pretrained(folder, gguf_file=name,
                                                       dtype=torch.float32).eval()


@pytest.fixture(scope='module')
def parity_prompts(smollm2, spec_bench_questions):
  """Chat-templated first turns of the first question of each of PARITY_GROUPS."""
  questions = load_questions(spec_bench_questions, num_questions_per_group=1,
                             groups=PARITY_GROUPS)
  by_group = {group_of(q['category']): q for q in questions}
  return [encode_prompt(smollm2, by_group[g]['turns'][0], chat=True) for g in PARITY_GROUPS]


def test_smollm2_prompts_have_different_lengths(parity_prompts):
  """The parity prompts span short to long contexts (so positions past 512 are checked)."""
  lengths = [len(p) for p in parity_prompts]
  assert len(set(lengths)) == 3 and min(lengths) < 64 and max(lengths) > 512, lengths


@pytest.mark.parametrize('index', range(len(PARITY_GROUPS)), ids=PARITY_GROUPS)
def test_smollm2_logits_match_transformers(smollm2, hf_smollm2, parity_prompts, index):
  """Logits at every prompt position agree with transformers within float32 noise.

  The bound: logits reach magnitude ~20 and come out of 30 layers of float32 matmuls whose
  summation order differs between XLA and PyTorch (relative rounding ~1e-6 per op, growing
  with depth), plus the 1e-6 difference of the two GGUF dequantisers; 1e-4 of the largest
  logit (~2e-3) is well above that noise yet far below any real bug (a wrong RoPE, mask or
  norm moves logits by O(1)).
  """
  prompt = parity_prompts[index]
  tokens_BT = np.asarray([prompt])

  logits_BTV = _full_logits(smollm2.params, smollm2.config, tokens_BT).logits_BPV
  expected_BTV = _hf_logits(hf_smollm2, tokens_BT)

  chex.assert_shape(logits_BTV, expected_BTV.shape)
  scale = float(np.abs(expected_BTV).max())
  bound = 1e-4 * max(scale, 1.0)
  gap = _max_abs_diff(logits_BTV, expected_BTV)
  assert gap < bound, (f'{PARITY_GROUPS[index]} ({len(prompt)} tokens): max |dlogit| = '
                       f'{gap:.3g} > {bound:.3g} (max |logit| {scale:.3g})')
  print(f'{PARITY_GROUPS[index]} ({len(prompt)} tokens): max |dlogit| = {gap:.3g}, '
        f'max |logit| = {scale:.3g}')


@pytest.fixture(scope='module')
def smollm2_greedy_decoder(smollm2):
  return Decoder(smollm2.params, _without_eos(smollm2.config), strategies.Vanilla())


@pytest.mark.parametrize('index', range(len(PARITY_GROUPS)), ids=PARITY_GROUPS)
def test_smollm2_greedy_matches_transformers_generate(smollm2_greedy_decoder, hf_smollm2,
                                                      parity_prompts, index):
  """NUM_GREEDY greedy tokens equal transformers' `generate` (EOS disabled on both sides)."""
  prompt = parity_prompts[index]
  expected = _hf_greedy(hf_smollm2, prompt, NUM_GREEDY)
  actual = smollm2_greedy_decoder.generate(prompt, NUM_GREEDY).token_ids
  first = next((i for i, (a, e) in enumerate(zip(actual, expected)) if a != e), None)
  assert actual == expected, f'{PARITY_GROUPS[index]}: first difference at new token {first}'


# ---------------------------------------------------------------------------------------------
# (c)-(d) The cache and the skip vector, on the tiny model of tests/tiny.py.


@pytest.fixture(scope='module')
def tiny_model():
  config = tiny.tiny_config()
  return config, tiny.tiny_params(config)


def test_incremental_decoding_equals_full_forward(tiny_model):
  """Prefill 30 tokens, 20 single-token steps, then a 5-token chunk: the logits of every
  position equal one forward over all 55 tokens (the cache is written and read correctly)."""
  config, params = tiny_model
  tokens_T = np.random.RandomState(2).randint(0, config.vocab_size, 55)
  full_TV = _full_logits(params, config, tokens_T[None]).logits_BPV[0]

  cache = init_cache(config, 64)
  pieces = [(0, 30)] + [(t, t + 1) for t in range(30, 50)] + [(50, 55)]
  incremental = []
  for start, stop in pieces:
    assert int(cache.length) == start
    out = _forward(params, config, jnp.asarray(tokens_T[None, start:stop]), cache)
    cache = out.cache
    incremental.append(out.logits_BPV[0])
  incremental_TV = jnp.concatenate(incremental, axis=0)

  assert int(cache.length) == 55
  # atol 5e-5 (~1e-5 of the largest logit, ~6 here): float32 rounding alone differs by up to
  # 1.7e-5 between a 30-row and a 55-row forward over the same uncached prefix (XLA blocks the
  # matmuls differently), so 1e-5 would fail on noise; a cache bug (wrong row, position or
  # mask) moves logits by O(0.1-1).
  chex.assert_trees_all_close(incremental_TV, full_TV, atol=5e-5, rtol=0)
  # The check can fail: logits depend on the context (a model that ignored it would pass).
  assert _max_abs_diff(full_TV[30], _full_logits(params, config, tokens_T[None, 30:31])
                       .logits_BPV[0, 0]) > 1e-2


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="XLA:CPU's programs")
@pytest.mark.parametrize('rows', [1, 3])
def test_on_cpu_per_layer_buffers_run_as_a_layer_loop_reading_weights_in_place(
    tiny_model, monkeypatch, rows):
  """On a CPU, per-layer buffers run as one compiled layer in a loop, each product a switch
  over the layers' own buffers (`model.scan_layers`): the unrolled program's (the
  accelerators') computation, and, unlike the stacked layout's loop, no copy of a layer's
  weights. (Not its bits: XLA fuses an unrolled layer's RoPE otherwise, and a cached key
  came out a bit apart. A decoder runs every pass of a width through one program, so its
  methods still compare exactly.)"""
  config, stacked = tiny_model
  per_layer = model_lib.unstack_layers(stacked)
  tokens_BT = jnp.asarray(np.random.RandomState(3).randint(0, config.vocab_size, (1, rows)))
  cache = _forward(per_layer, config, jnp.asarray(tiny.prompts(config)[0])[None],
                   init_cache(config, 64)).cache

  def program(params):
    fn = jax.jit(functools.partial(model_lib.forward, config=config))
    return fn.lower(params, tokens_BT=tokens_BT, cache=cache).compile()

  looped = program(per_layer)
  monkeypatch.setattr(model_lib, 'loops_over_layers', lambda: False)
  unrolled = program(per_layer)
  chex.assert_trees_all_close(looped(per_layer, tokens_BT=tokens_BT, cache=cache),
                              unrolled(per_layer, tokens_BT=tokens_BT, cache=cache),
                              atol=1e-6, rtol=0)
  assert looped.as_text().count('conditional(') == 4  # q/k/v, o, gate/up and down
  assert unrolled.as_text().count('conditional(') == 0
  gate_up = ','.join(map(str, per_layer['layers'][0]['w_gate_up'].shape))
  down = ','.join(map(str, per_layer['layers'][0]['w_down'].shape))
  weight_shaped = rf'= f32\[({gate_up}|{down}|1,{down})\]\S* (fusion|copy|dynamic-slice)\('
  assert not re.search(weight_shaped, looped.as_text())
  assert re.search(weight_shaped, program(stacked).as_text())  # the stacked loop's copies


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="XLA:CPU's programs")
@pytest.mark.parametrize('dtype, atol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_a_one_row_closing_product_runs_as_two_halves_on_cpu(dtype, atol):
  """Without the CPU product kernel (off here; bfloat16 never has it), a 1-row chunk's o and
  down products run on a CPU as two products over the halves of K (one batched product),
  within rounding of the one product; a 2-row chunk keeps the one."""
  x_BTK = jax.random.normal(jax.random.key(0), (1, 2, 96), jnp.float32).astype(dtype)
  w_KD = (jax.random.normal(jax.random.key(1), (96, 64), jnp.float32) / 10).astype(dtype)
  product = jax.jit(model_lib._closing_product)  # pylint: disable=protected-access

  def batched_dots(x):
    with cpu_product.use_kernel(False):
      hlo = product.lower(x, w_KD).compile().as_text()
    return [line for line in hlo.splitlines() if ' dot(' in line and 'lhs_batch_dims' in line]

  with cpu_product.use_kernel(False):
    one_row_1TD = product(x_BTK[:, :1], w_KD)
  expected_1TD = jnp.dot(x_BTK[:, :1].astype(jnp.float32), w_KD.astype(jnp.float32))
  chex.assert_trees_all_close(one_row_1TD.astype(jnp.float32), expected_1TD, atol=atol, rtol=0)
  assert one_row_1TD.dtype == dtype
  assert batched_dots(x_BTK[:, :1])
  assert not batched_dots(x_BTK)


def _drop_layers(params, skip):
  """The params of the model with the layers in `skip` removed from the stacks."""
  layers = jax.tree.map(lambda w: jnp.asarray(np.delete(np.asarray(w), skip, axis=0)),
                        params['layers'])
  return dict(params, layers=layers)


@pytest.mark.parametrize('skip', [(0,), (5,), (2, 3), (0, 2, 4), (1, 3, 4, 5)])
def test_skip_vector_equals_model_without_those_layers(tiny_model, skip):
  """With a 12-token prefix written by the full model, an 8-token chunk through the skip
  vector gives the logits and new cache rows of a model built without the skipped layers,
  and leaves every cache row of the skipped layers untouched."""
  config, params = tiny_model
  L = config.num_layers
  kept = [i for i in range(L) if i not in skip]
  tokens_T = np.random.RandomState(3).randint(0, config.vocab_size, 20)
  skip_L = jnp.asarray(np.isin(np.arange(L), skip))

  prefix = _forward(params, config, jnp.asarray(tokens_T[None, :12]), init_cache(config, 32))
  before = prefix.cache
  out = _forward(params, config, jnp.asarray(tokens_T[None, 12:]), before, skip_L=skip_L)

  small_config = dataclasses.replace(config, num_layers=L - len(skip))
  small_cache = before.replace(k_LBSKh=before.k_LBSKh[np.asarray(kept)],
                               v_LBSKh=before.v_LBSKh[np.asarray(kept)])
  expected = _forward(_drop_layers(params, skip), small_config,
                      jnp.asarray(tokens_T[None, 12:]), small_cache)

  chex.assert_trees_all_close(out.logits_BPV, expected.logits_BPV, atol=1e-5, rtol=0)
  full = _forward(params, config, jnp.asarray(tokens_T[None, 12:]), before)
  assert _max_abs_diff(full.logits_BPV, expected.logits_BPV) > 1e-3  # skipping is visible
  assert int(out.cache.length) == int(expected.cache.length) == 20
  for i in skip:
    np.testing.assert_array_equal(out.cache.k_LBSKh[i], before.k_LBSKh[i], err_msg=f'k{i}')
    np.testing.assert_array_equal(out.cache.v_LBSKh[i], before.v_LBSKh[i], err_msg=f'v{i}')
  chex.assert_trees_all_close(
      (out.cache.k_LBSKh[np.asarray(kept)], out.cache.v_LBSKh[np.asarray(kept)]),
      (expected.cache.k_LBSKh, expected.cache.v_LBSKh), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# (e) Hidden states, against transformers' output_hidden_states on the tiny checkpoint.


def test_hidden_states_match_transformers(tiny_pair):
  """The hidden states are [L+1, B, P, D] at the requested positions: h_0 is the embedding
  row, h_1..h_{L-1} equal transformers' layer outputs, norm(h_L) equals transformers' last
  (post-norm) hidden state, and the LM head on h_L reproduces the returned logits."""
  ours, hf_model = tiny_pair
  config, params = ours.config, ours.params
  L, D = config.num_layers, config.hidden_size
  tokens_BT = np.random.RandomState(4).randint(0, config.vocab_size, (2, 40))
  out_idx_BP = np.asarray([[0, 17, 39], [5, 6, 38]], np.int32)
  cache = init_cache(config, 40, batch=2)

  out = _forward(params, config, jnp.asarray(tokens_BT), cache,
                 out_idx_BP=jnp.asarray(out_idx_BP))
  with torch.inference_mode():
    hf_out = hf_model(torch.tensor(tokens_BT), output_hidden_states=True)

  hiddens_LBPD = out.hiddens_LBPD
  chex.assert_shape(hiddens_LBPD, (L + 1, 2, 3, D))
  chex.assert_shape(out.logits_BPV, (2, 3, config.vocab_size))
  assert len(hf_out.hidden_states) == L + 1
  picked = [np.take_along_axis(h.numpy(), out_idx_BP[..., None], axis=1)
            for h in hf_out.hidden_states]
  tokens_BP = np.take_along_axis(tokens_BT, out_idx_BP, axis=1)

  np.testing.assert_array_equal(hiddens_LBPD[0], np.asarray(params['embed'])[tokens_BP])
  for i in range(1, L):
    chex.assert_trees_all_close(hiddens_LBPD[i], picked[i], atol=1e-5, rtol=0)
  normed_BPD = model_lib.rms_norm(hiddens_LBPD[L], params['final_norm'], config.rms_norm_eps)
  chex.assert_trees_all_close(normed_BPD, picked[L], atol=1e-5, rtol=0)
  chex.assert_trees_all_close(model_lib.lm_head(params, config, hiddens_LBPD[L]),
                              out.logits_BPV, atol=1e-6, rtol=0)
  hf_logits_BPV = np.take_along_axis(hf_out.logits.numpy(), out_idx_BP[..., None], axis=1)
  chex.assert_trees_all_close(out.logits_BPV, hf_logits_BPV, atol=1e-4, rtol=0)
