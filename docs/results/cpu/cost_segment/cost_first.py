# The first measure_costs in a fresh process (after compiling, as a first generation runs it).
import clasp_jax
from clasp_jax import strategies
from clasp_jax.strategies import adaptive
model = clasp_jax.load()
strategy = strategies.build('clasp', model.config)
decoder = clasp_jax.Decoder(model.params, model.config, strategy)
prompt = clasp_jax.encode_prompt(model, 'Why is the sky blue?', chat=True)
state = decoder.start(prompt, 128)
decoder.compile(len(prompt), 128)
pair = (strategy.candidates[0], strategy.candidates[-1])
c = adaptive.measure_costs(decoder, state, 128, pair)
print('first', {k: round(v * 1000, 2) for k, v in vars(c).items()}, flush=True)
