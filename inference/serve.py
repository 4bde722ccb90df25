"""`python -m inference.serve`: the OpenAI-compatible server, which lives in `inference/serving/` (app.py)."""
import sys

from inference.serving.app import main, parse_args  # noqa: F401 - the command's entry points

if __name__ == "__main__":
    sys.exit(main())
