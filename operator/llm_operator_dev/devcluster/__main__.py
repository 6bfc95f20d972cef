"""`python -m llm_operator_dev.devcluster cluster up`, as `llm-operator dev cluster up`."""

import sys

from llm_operator_dev.devcluster.cli import main

sys.exit(main(sys.argv[1:]))
