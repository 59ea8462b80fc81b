"""SamplingParams: vLLM-compatible defaults, normalization and validation."""

import math

import pytest

from ember.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.seed is None and p.logprobs is None and p.prompt_logprobs is None
    assert p.max_tokens == 16 and p.min_tokens == 0
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.skip_special_tokens
    assert not p.greedy


@pytest.mark.parametrize(
    "stop, expected",
    [(None, []), ("###", ["###"]), (["a", "bc"], ["a", "bc"]), (("x",), ["x"])],
)
def test_stop_is_normalized_to_a_list(stop, expected):
    assert SamplingParams(stop=stop).stop == expected


def test_stop_token_ids_normalized_and_copied():
    ids = (3, 7)
    p = SamplingParams(stop_token_ids=ids)
    assert p.stop_token_ids == [3, 7] and isinstance(p.stop_token_ids, list)


def test_top_k_zero_means_off():
    assert SamplingParams(top_k=0).top_k == -1
    assert SamplingParams(top_k=5).top_k == 5


@pytest.mark.parametrize("temperature, greedy", [(0.0, True), (1e-6, True), (1e-5, False), (0.7, False)])
def test_greedy_property(temperature, greedy):
    assert SamplingParams(temperature=temperature).greedy is greedy


def test_greedy_neutralizes_filters():
    p = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.3)
    assert (p.top_k, p.top_p, p.min_p) == (-1, 1.0, 0.0)
    q = SamplingParams(temperature=0.5, top_k=5, top_p=0.5, min_p=0.3)
    assert (q.top_k, q.top_p, q.min_p) == (5, 0.5, 0.3)


def test_boundary_values_are_accepted():
    SamplingParams(
        top_p=1.0, min_p=1.0, presence_penalty=-2.0, frequency_penalty=2.0,
        repetition_penalty=0.01, max_tokens=None, min_tokens=5, logprobs=0,
        prompt_logprobs=0, temperature=0.0, seed=0,
    )
    SamplingParams(min_p=0.0, presence_penalty=2.0, frequency_penalty=-2.0, max_tokens=1)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n": 0}, "n"),
        ({"n": 1.5}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": ["2"]}, "stop_token_ids"),
    ],
)
def test_invalid_values_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
