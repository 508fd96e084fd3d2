"""`python -m adarec.train ...`, `torchrun --nproc_per_node N -m adarec.train ...` and
`deepspeed --num_gpus N --module adarec.train ...`.

Same arguments as `adarec train`. Imported, this module is also callable: `adarec.train(...)` is
the Python API's train (adarec/api.py) whether `adarec.train` resolves to that function or, once
something has imported this module, to the module itself.
"""

import argparse
import sys
import types

from .cli import add_train_arguments, run, train_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adarec.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    return run(train_command, parser.parse_args(argv))


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .api import train

        return train(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
