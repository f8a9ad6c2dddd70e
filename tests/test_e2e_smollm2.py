"""CLaSp is lossless on the real model: greedy self-speculative output equals plain greedy.

SmolLM2-135M-Instruct (the embedded GGUF, float32), 6 Spec-Bench prompts: the shortest question
of each of the six groups (by the characters of its first turn), first turn only,
chat-templated. Every drafting method must reproduce vanilla greedy decoding token for token (EOS
handling included).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax import model as model_lib
from clasp_jax import strategies
from clasp_jax.bench.specbench import GROUPS
from clasp_jax.bench.specbench import group_of
from clasp_jax.bench.specbench import load_questions
from clasp_jax.cache import init_cache
from clasp_jax.engine import Decoder
from clasp_jax.generation import encode_prompt
import tiny

pytestmark = pytest.mark.slow  # minutes in all on 2 cores: started first (conftest.py)

# 16 new tokens; the benchmarks in docs/results check 30 questions. In float32 ConfLayers on
# every group, and each CLaSp setting on two groups of its own (`SETTING_GROUPS`: together
# they cover the six once); the default method (prompt lookup first) and CLaSp in the
# bfloat16 test below. Every method runs in both dtypes on the tiny model (tests/test_exact.py
# bit for bit, tests/test_engine.py), static and prompt lookup there only, and ConfLayers in
# bfloat16 there only (on this model it took a minute of the suite's 2 cores).
MAX_NEW = 16

SETTINGS = {
    'clasp_M4_K8_LOI1_DET0.7': ('clasp', dict(skip_layers=4, num_draft_tokens=8, loi=1,
                                              draft_exit_threshold=0.7)),
    'clasp_M0_K4_LOI1_DET0.0': ('clasp', dict(skip_layers=0, num_draft_tokens=4, loi=1,
                                              draft_exit_threshold=0.0)),
    'clasp_M8_K6_LOI4_DET0.3': ('clasp', dict(skip_layers=8, num_draft_tokens=6, loi=4,
                                              draft_exit_threshold=0.3)),
}
#: Which of the six groups' questions (indices into `GROUPS`) each CLaSp setting decodes.
SETTING_GROUPS = {setting: (i, i + 3) for i, setting in enumerate(SETTINGS)}


@pytest.fixture(scope='module')
def questions(spec_bench_questions):
  """Every group's shortest question: each kind of text, at the least prefill on 2 cores."""
  everything = load_questions(spec_bench_questions)
  return [min((q for q in everything if group_of(q['category']) == group),
              key=lambda q: len(q['turns'][0])) for group in GROUPS]


@pytest.fixture(scope='module')
def prompts(smollm2, questions):
  return [encode_prompt(smollm2, q['turns'][0], chat=True) for q in questions]


@pytest.fixture(scope='module')
def vanilla(smollm2, prompts):
  """Plain greedy decoding of every prompt (computed once)."""
  decoder = Decoder(smollm2.params, smollm2.config, strategies.Vanilla())
  return [decoder.generate(p, MAX_NEW).token_ids for p in prompts]


@pytest.fixture(scope='module')
def generate_all(smollm2, prompts):
  """`generate_all(setting) -> [Generation]` over the setting's groups' prompts
  (`SETTING_GROUPS`), computed once per setting."""
  done = {}

  def run(setting):
    if setting not in done:
      method, settings = SETTINGS[setting]
      strategy = strategies.build(method, smollm2.config, **settings)
      decoder = Decoder(smollm2.params, smollm2.config, strategy)
      done[setting] = [decoder.generate(prompts[i], MAX_NEW) for i in SETTING_GROUPS[setting]]
    return done[setting]

  return run


def _diagnose(smollm2, prompt, expected, actual) -> str:
  """Where two generations first differ, and how close the full model's top two logits are
  there (a float32 near-tie between a 1-token and a (K+1)-token pass would show a tiny gap)."""
  i = next((i for i, (a, e) in enumerate(zip(actual, expected)) if a != e),
           min(len(actual), len(expected)))
  tokens = np.asarray([prompt + expected[:i]], np.int32)
  cache = init_cache(smollm2.config, tokens.shape[1])
  logits_V = np.asarray(model_lib.forward(smollm2.params, smollm2.config, tokens, cache,
                                          out_idx_BP=np.asarray([[tokens.shape[1] - 1]]))
                        .logits_BPV[0, 0])
  top2 = np.argsort(logits_V)[::-1][:2]
  got = actual[i] if i < len(actual) else 'end'
  want = expected[i] if i < len(expected) else 'end'
  return (f'first difference at new token {i}: vanilla {want}, speculative {got}; '
          f'full-model top-2 {top2.tolist()} logits {logits_V[top2].tolist()} '
          f'gap {logits_V[top2[0]] - logits_V[top2[1]]:.3g}')


@pytest.mark.parametrize('setting', list(SETTINGS))
def test_greedy_output_is_identical_to_vanilla(smollm2, questions, prompts, vanilla,
                                               generate_all, setting):
  """Each setting's greedy tokens equal vanilla's on its groups' prompts."""
  mismatches = []
  for i, out in zip(SETTING_GROUPS[setting], generate_all(setting)):
    question, prompt, expected = questions[i], prompts[i], vanilla[i]
    assert sum(out.accept_lengths) + 1 >= len(out.token_ids)
    if out.token_ids != expected:
      mismatches.append(f'question {question["question_id"]} ({question["category"]}, '
                        f'{len(prompt)} prompt tokens): '
                        + _diagnose(smollm2, prompt, expected, out.token_ids))
  assert not mismatches, f'{setting}:\n' + '\n'.join(mismatches)


def test_full_model_draft_is_verified(generate_all):
  """With M = 0 the draft is the full model, so drafts must be accepted: more than one token
  per round on average (plain decoding commits exactly one)."""
  gens = generate_all('clasp_M0_K4_LOI1_DET0.0')
  accepts = [a for g in gens for a in g.accept_lengths]
  assert np.mean(accepts) > 1.0, np.mean(accepts)
  print(f'M=0 mean tokens per round: {np.mean(accepts):.3f}')


def test_conflayers_is_identical_to_vanilla_and_its_search_moves(smollm2, prompts, vanilla):
  """ConfLayers gives vanilla's tokens on every prompt, never skips the first or last layer,
  and its confidence search changes the skip set within the generations."""
  strategy = strategies.build('conflayers', smollm2.config,
                              conflayers_settings=tiny.QUICK_CONFLAYERS)
  decoder = Decoder(smollm2.params, smollm2.config, strategy)
  skip_sets = set()
  for prompt, expected in zip(prompts, vanilla):
    out = decoder.generate(prompt, MAX_NEW)
    assert out.token_ids == expected
    assert not out.skip_sets[:, 0].any() and not out.skip_sets[:, -1].any()
    skip_sets |= {tuple(s) for s in out.skip_sets.tolist()}
  assert len(skip_sets) > 1  # the search changed the set


# bfloat16: a plain step and a verify pass compute a token's logits the same way, so the
# drafting methods match plain decoding here too (tests/test_exact.py checks it bit for bit).
BF16_NEW = 16
BF16_SETTINGS = {
    'clasp_default': ('clasp', {}),
    'clasp_M4_nolookup': ('clasp', dict(skip_layers=4, lookup=False, loi=1)),
}


@pytest.fixture(scope='module')
def bf16_model(smollm2):
  return jax.tree.map(lambda w: w.astype(jnp.bfloat16), smollm2.params), smollm2.config


@pytest.fixture(scope='module')
def bf16_prompts(prompts):
  return prompts[:2]


@pytest.fixture(scope='module')
def bf16_vanilla(bf16_model, bf16_prompts):
  params, config = bf16_model
  decoder = Decoder(params, config, strategies.Vanilla())
  return [decoder.generate(p, BF16_NEW).token_ids for p in bf16_prompts]


@pytest.mark.parametrize('setting', list(BF16_SETTINGS))
def test_bfloat16_greedy_output_is_identical_to_vanilla(bf16_model, bf16_prompts, bf16_vanilla,
                                                        setting):
  params, config = bf16_model
  method, settings = BF16_SETTINGS[setting]
  decoder = Decoder(params, config, strategies.build(method, config, **settings))
  if isinstance(decoder.strategy, strategies.AdaptiveClasp):
    tiny.set_costs(decoder)  # `auto`, the default method (the notebook measures its costs)
  outs = [decoder.generate(p, BF16_NEW) for p in bf16_prompts]
  assert [o.token_ids for o in outs] == bf16_vanilla
  assert any(d > 0 for o in outs for d in o.draft_lengths)  # it did draft
