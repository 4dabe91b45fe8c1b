import sys

from llmstages.cli import main

sys.exit(main())
