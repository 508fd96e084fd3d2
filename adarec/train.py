"""`python -m adarec.train ...` and `deepspeed --num_gpus N --module adarec.train ...`.

Same arguments as `adarec train`.
"""

import argparse
import sys

from .cli import add_train_arguments, run, train_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adarec.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    return run(train_command, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
