# One process per XLA_FLAGS setting, one after the other; each appends its row to $OUT/flags.jsonl.
# Run from the repository root of an installed checkout, OUT set to a folder.
run() { XLA_FLAGS="$3" timeout ${4:-120} python docs/results/h200/decode/norm_prologue/xla_flags/flag_worker.py $1 $2 2>&1 | grep '^{' ; }
P=smollm2-135m
run $P default ""
run $P pdl "--xla_gpu_enable_pdl=true"
run $P nopdl "--xla_gpu_enable_pdl=false"
run $P heroless "--xla_gpu_experimental_enable_triton_heroless_priority_fusion=true"
run $P mof "--xla_gpu_unsupported_enable_triton_multi_output_fusion=true"
run $P alltriton "--xla_gpu_experimental_all_fusions_with_triton=true"
run $P blocklevel "--xla_gpu_experimental_enable_fusion_block_level_rewriter=true"
run $P default2 ""
P=llama3-8b
run $P default "" 200
run $P pdl "--xla_gpu_enable_pdl=true" 200
run $P nopdl "--xla_gpu_enable_pdl=false" 200
