"""Every model trains for about 150 steps on synthetic data with long, short and length-1 histories
(hidden 16 and 32, two seeds) and stays finite, with a thousandth of its random hash words forced
to the extreme values (profiling/stress.py; `python -m adarec.profiling.stress` is the longer grid).
The extreme words are what made ADARec's Gumbel noise infinite once every ~150 Beauty steps; here
such a draw occurs in every step, so a conversion that is not finite at an extreme fails at once."""

import pytest
import torch
from adarec.profiling import stress

from adarec.keyed_random import KeyedDraws, Streams

CASES = [(16, 0), (32, 1)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return stress.write_stress_data(tmp_path_factory.mktemp("stress") / "stress.txt")


def test_the_stress_data_has_long_short_and_length_one_histories(data):
    lengths = [len(line.split()) - 1 for line in data.read_text().splitlines()]
    training = [n - 3 for n in lengths]              # the training input drops the last three items
    assert min(training) == 0 and 1 in training and max(training) > 20      # 20 = the stress max_len


def test_extreme_words_are_injected_at_the_given_rate():
    draws = KeyedDraws(torch.arange(4000, dtype=torch.int64), Streams.GUMBEL)
    plain = KeyedDraws(torch.arange(4000, dtype=torch.int64), Streams.GUMBEL).bits((50,))
    with stress.extreme_words(1e-3):
        injected = draws.bits((50,))
    changed = float((injected != plain).double().mean())
    assert 0.5e-3 < changed < 1.5e-3
    assert set(injected[injected != plain].tolist()) <= set(stress.EXTREME_WORDS)
    assert torch.equal(KeyedDraws(torch.arange(4000, dtype=torch.int64), Streams.GUMBEL).bits((50,)), plain)


@pytest.mark.parametrize("model", stress.MODELS)
def test_every_model_stays_finite(model, data, tmp_path):
    torch.set_num_threads(1)
    for hidden, seed in CASES:
        row = stress.stress_case(model, data, hidden, seed, steps=150, work_dir=tmp_path / f"{hidden}_{seed}")
        assert row["ok"], row
        assert row["steps"] >= 150 and row["last_loss"] < row["first_loss"], row
