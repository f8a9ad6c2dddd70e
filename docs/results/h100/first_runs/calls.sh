# The device calls, in order (each on a fresh H100 machine, the checkout installed with
# `pip install --no-deps -e .`). GGUF: the embedded SmolLM2-135M-Instruct GGUF (carried in two
# halves, sha256 b179c952...db53); MODEL: a random model of its shape in a Hugging Face folder
# (config and tokenizer from the GGUF, `LlamaForCausalLM(config)` in bf16, torch seed 0);
# OLD: `git archive 767b68c clasp_jax configs | tar -x` with `clasp_jax/configs` linked to
# `configs`; QUESTIONS: Spec-Bench's question.jsonl; CACHE*: cache folders, empty at each
# call's start. Every clasp-bench below also takes:
S="--groups=mt_bench,summarization,math_reasoning,rag --num_questions=3 --max_new_tokens=256 \
   --warmup=1 --interleave --questions=$QUESTIONS"
R=docs/results/h100/first_runs
# A. b71f6c5 against 767b68c on the embedded model (summaries.md, turns_gguf_head_1.json)
for i in 1 2; do
  clasp-bench --model=$GGUF --methods=vanilla,clasp $S --cache_dir=$CACHE --out_dir=head_$i
  (cd $OLD && PYTHONPATH=. python -m clasp_jax.cli.bench --model=$GGUF --methods=vanilla,clasp \
     $S --cache_dir=$CACHE_OLD --out_dir=old_$i)
done
# B. the same with plain decoding alone on MODEL, and b71f6c5 without first runs
#    (FR=none; turns_random_vanilla_head_nofr_old.json)
for i in 1 2; do
  clasp-bench --model=$MODEL --methods=vanilla $S --cache_dir=$CACHE --out_dir=head_$i
  FR=none python $R/bench_fr.py --model=$MODEL --methods=vanilla $S --cache_dir=$CACHE --out_dir=nofr_$i
  (cd $OLD && PYTHONPATH=. python -m clasp_jax.cli.bench --model=$MODEL --methods=vanilla \
     $S --cache_dir=$CACHE_OLD --out_dir=old_$i)
done
# C. first runs four ways on b71f6c5 (turns_random_vanilla_modes.json). The call ran an
#    earlier bench_fr.py with modes all0 (the library as it was: FR=zero here), none, prefill
#    and round1 (b71f6c5's first runs with one round instead of none, at b71f6c5's budget of 0
#    tokens: one round then, as FR=lib's budget of 1 gives)
for i in 1 2; do for fr in zero none prefill lib; do
  FR=$fr python $R/bench_fr.py --model=$MODEL --methods=vanilla $S --cache_dir=$CACHE --out_dir=${fr}_$i
done; done
# D. this commit's first runs (FR=lib) against b71f6c5's and the prefill's alone
#    (turns_random_vanilla_clasp_modes.json)
for i in 1 2; do for fr in lib zero prefill; do
  FR=$fr python $R/bench_fr.py --model=$MODEL --methods=vanilla,clasp $S --cache_dir=$CACHE --out_dir=${fr}_$i
done; done
# E. a later call: bb66890 against b71f6c5 on the embedded model (OLD then the b71f6c5 archive;
#    summaries.md, turns_gguf_e.json)
for i in 1 2; do
  clasp-bench --model=$GGUF --methods=vanilla,clasp $S --cache_dir=$CACHE --out_dir=head_$i
  (cd $OLD && PYTHONPATH=. python -m clasp_jax.cli.bench --model=$GGUF --methods=vanilla,clasp \
     $S --cache_dir=$CACHE_OLD --out_dir=old_$i)
done
