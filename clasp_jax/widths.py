"""How many tokens a full-model pass holds, per platform.

Every full-model pass of a decoder, a plain step as much as a verify pass, is `pass_width`
tokens wide (`engine.full_pass`), so that a token's logits are the same bits whichever pass
computed them. Decoders therefore compare exactly only at one width, and a decoder that does
not choose takes its platform's. The exception: a decoder whose passes compute each row as a
1-row pass would (`engine.Decoder`'s `rows_apart`, a CPU in float32) takes its plain steps 1
row wide.
"""

from __future__ import annotations

import jax

#: Tokens per full-model pass on GPUs and TPUs, where a 16-row pass costs about what a 1-row
#: step costs (the weights are read once either way): it covers K + 1 for K up to 15 in one
#: pass and leaves the rows past K + 1 to the DP (`Clasp.dp_in_verify`).
DEFAULT_PASS_WIDTH = 16
#: Tokens per full-model pass on a CPU, which computes rather than waits for memory, so rows
#: cost time: K + 1 for the CPU's default K = 2. On three Intel Xeons (2 cores each), against
#: 9 rows with K = 8, the default method ran 1.21-1.43x faster, prompt lookup 1.23-1.42x and
#: plain decoding 1.28-1.54x (docs/results/cpu/pass_width/). No row is left to the DP: CLaSp
#: runs it as a pass of its own.
CPU_PASS_WIDTH = 3


def default_pass_width() -> int:
  """The pass width of a decoder that does not choose one: one per platform, since decoders
  compare exactly only at one width (`CPU_PASS_WIDTH` on a CPU, else `DEFAULT_PASS_WIDTH`)."""
  return CPU_PASS_WIDTH if jax.default_backend() == 'cpu' else DEFAULT_PASS_WIDTH


def verify_rows(num_draft_tokens: int, pass_width: int) -> int:
  """Rows of a verify pass of K drafts: K + 1 rounded up to whole passes of `pass_width`."""
  return -(-(num_draft_tokens + 1) // pass_width) * pass_width
