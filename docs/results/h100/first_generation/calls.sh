# The device calls, in order (each on a fresh H100 machine, the checkout installed with
# `pip install --no-deps -e .`). MODEL: a random model of SmolLM2-135M-Instruct's shape in a
# Hugging Face folder (config and tokenizer from the embedded GGUF, `LlamaForCausalLM(config)`
# in bf16, torch seed 0); CACHE: a cache folder, empty at each call's start; OUT: a folder.
R=docs/results/h100/first_generation
# 1. first_generations.jsonl (the first process also filled CACHE)
for pre in false true; do for ml in LAZY EAGER; do
  XLA_PYTHON_CLIENT_PREALLOCATE=$pre CUDA_MODULE_LOADING=$ml python $R/first_generations.py $MODEL $CACHE
done; done
# 2. first_runs.jsonl
python $R/first_runs.py $MODEL $CACHE first
for t in a b; do
  python $R/first_runs.py $MODEL $CACHE plain_$t
  python $R/first_runs.py $MODEL $CACHE zero_first
  XLA_FLAGS=--xla_gpu_enable_command_buffer= python $R/first_runs.py $MODEL $CACHE2 nocmdbuf_$t
done
# 3. first_prefill.jsonl
for t in base nocudnn probe prewarm base nocudnn probe prewarm base nocudnn prewarm; do
  python $R/first_prefill.py $MODEL $CACHE $t
done
# 4. cli_phases.txt
for m in vanilla vanilla vanilla vanilla clasp clasp clasp; do
  python $R/cli_phases.py $MODEL $CACHE --method=$m | grep -E "PHASES|prompt tokens"
done
