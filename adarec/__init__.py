"""adarec: a training engine for diffusion-augmented sequential recommendation.

The Python API (adarec/api.py, docs/running.md) is loaded on first use, so that `import adarec`
stays cheap (no torch): `adarec.train(config, overrides, output_dir=...)` trains a run and returns
a RunResult; `adarec.load_run(run_dir)` gives a TrainedRun that scores and recommends.
"""

__version__ = "0.1.0"

_API = ("RunResult", "TrainedRun", "load_run", "train")
__all__ = ["RunResult", "TrainedRun", "__version__", "load_run", "train"]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
