"""clasp-bench from a source checkout: python scripts/bench.py --methods=... (see --help)."""
from clasp_jax.cli.bench import run

if __name__ == '__main__':
  run()
