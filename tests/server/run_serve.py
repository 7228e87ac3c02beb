"""``python run_serve.py SPEC``: ``trio.run(serve, milter, SPEC)``, nothing else."""

import logging
import sys

import trio
from sample_milters import milter  # type: ignore[import-not-found]  # beside this script

from triomilter import serve

logging.basicConfig(level=logging.INFO)
trio.run(serve, milter, sys.argv[1])
