"""Each kernel of a plain step's layer (from `../plain_kernels.py`'s profile) beside the HLO
instruction that launched it (from the compiled segment's optimized HLO), in program order.

  python layer_kernels.py <preset>

Reads plain_kernels_<preset>.json and <preset>_plain_segment0.hlo.txt.gz (both written by
`../plain_kernels.py`) from the working folder; prints the table of README.md and writes
layer_hlo_<preset>.txt, one layer's instructions.
"""
import gzip, json, re, sys

preset = sys.argv[1]
profile = json.load(open(f'plain_kernels_{preset}.json'))
per_layer = {k['kernel']: k for k in profile['kernels'] if k['calls_per_layer_token'] >= 0.9}
lines = gzip.open(f'{preset}_plain_segment0.hlo.txt.gz', 'rt').read().splitlines()
# Program order: the first instruction whose name the profile reports (a name's suffix is
# its instance: `fusion_4228` in the trace is `%fusion.4228` in the HLO).
rows = []
for kernel, k in per_layer.items():
  name = kernel if kernel == 'cache_attention' else re.sub(r'_(\d+)$', r'.\1', kernel)
  pattern = (r'custom-call\(.*cache_attention/pallas_call' if name == 'cache_attention'
             else rf'^\s*%{re.escape(name)} = ')
  at = next(i for i, line in enumerate(lines) if re.search(pattern, line))
  line = lines[at]
  shape = re.search(r'= (\(?[a-z0-9]+\[[^=]*?\]\{[^}]*\}\)?)', line)
  op = re.search(r'op_name="([^"]+)"', line)
  kind = re.search(r'kind=(k\w+)', line)
  rows.append((at, kernel, k['us_per_layer_token'], k['calls_per_layer_token'],
               kind.group(1) if kind else 'custom-call', shape.group(1) if shape else '',
               op.group(1).replace('jit(_segment)/while/body/', '') if op else ''))
print(f'| kernel | us a layer and token | calls | kind | output | from (op_name) |')
print('|---|---|---|---|---|---|')
for _, kernel, us, calls, kind, shape, op in sorted(rows):
  print(f'| `{kernel}` | {us:.2f} | {calls:.2f} | {kind} | `{shape}` | `{op}` |')

# One layer's instructions, from its q/k/v product to the next layer's (attributes but the
# source op's name dropped): what the table's kernels compute and how they connect.
qkv = min(rows)[0]  # the q/k/v product comes first in a layer
dedup = re.search(r'deduplicated_name="([^"]+)"', lines[qkv]).group(1)
end = next(i for i in range(qkv + 1, len(lines))
           if f'deduplicated_name="{dedup}"' in lines[i] and ' = ' in lines[i])
with open(f'layer_hlo_{preset}.txt', 'w') as f:
  for line in lines[qkv - 2:end]:
    op = re.search(r'op_name="([^"]+)"', line)
    line = re.split(r', (?:metadata|backend_config|frontend_attributes|operand_layout_constraints)=', line)[0]
    f.write(line.strip() + (f'  # {op.group(1).replace("jit(_segment)/while/body/", "")}' if op else '') + '\n')
