"""``python -m llm_operator.devcluster cluster up`` (same as ``llm-operator dev cluster up``)."""

import sys

from llm_operator.devcluster.cli import main

sys.exit(main(sys.argv[1:]))
