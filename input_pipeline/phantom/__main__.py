"""python -m input_pipeline.phantom: the preview command (cli.py)."""

import sys

from input_pipeline.phantom import cli

if __name__ == '__main__':
  cli.main(sys.argv[1:])
