"""clasp-generate from a source checkout: python scripts/generate.py --prompt=... (see --help)."""
from clasp_jax.cli.generate import run

if __name__ == '__main__':
  run()
