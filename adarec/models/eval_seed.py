"""The run's seed that keys a peer's evaluation noise, saved with its weights (docs/peers.md,
"In the engine").

A reverse process starts from noise keyed by each row's contents and this seed
(`adarec.keyed_random.sequence_keys`). `prepare` sets it, but a resumed run, `adarec evaluate`
and the reload of the best weights do not call `prepare`: the seed is therefore a buffer, read
back to the host once per load, never per score call.
"""

from __future__ import annotations

import torch

from adarec.keyed_random import sequence_keys


def _read_back(module, incompatible_keys) -> None:
    module._eval_seed_value = int(module.eval_seed)


def add_eval_seed(module: torch.nn.Module) -> None:
    """Give `module` the `eval_seed` buffer (0 until `set_eval_seed`) and its load hook."""
    module.register_buffer("eval_seed", torch.zeros((), dtype=torch.int64))
    module._eval_seed_value = 0
    module.register_load_state_dict_post_hook(_read_back)


def set_eval_seed(module: torch.nn.Module, seed: int) -> None:
    module.eval_seed.fill_(int(seed))
    module._eval_seed_value = int(seed)


def eval_keys(module: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Row keys [B] of an evaluation batch: its rows' contents and the module's seed."""
    return sequence_keys(input_ids, module._eval_seed_value)
