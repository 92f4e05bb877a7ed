import sys

from .cli import main

if __name__ == "__main__":  # spawned tokenizer workers import this module too
    sys.exit(main())
