"""Policy candidates for comparisons: samples of the policy being improved, for annotators to
rank (what InstructGPT's labelers ranked; `data.candidates = policy | mixed`).

Data generation, not evaluation: `preferences.load_comparisons` draws with the sampler
`policy_candidates` returns.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from rlhf_jax.evaluation import sample_texts
from rlhf_jax.rng import Purpose


def policy_sampler(policy, tokenizer, settings, key, place=None) -> Callable:
    """`sample(index, prompts) -> sample_texts output` of a loaded policy with a config's
    sampling block (`max_prompt_len`, `max_new_tokens`, `temperature`, `batch_size`); call
    `index` draws with `fold_in(key, index)` (e.g. `preferences.load_comparisons`)."""
    def sample(index: int, prompts: list[str]) -> dict:
        return sample_texts(policy.cfg, policy.params, tokenizer, prompts,
                            jax.random.fold_in(key, index),
                            max_prompt_len=int(settings.max_prompt_len),
                            max_new_tokens=int(settings.max_new_tokens),
                            temperature=float(settings.temperature),
                            batch_size=int(settings.batch_size), place=place)

    return sample


def policy_candidates(config, policy, tokenizer, place) -> Callable | None:
    """The sampler `preferences.load_comparisons` draws policy candidates with: the policy at
    `config.policy_data`'s settings when `config.data.candidates` asks for policy samples;
    None for `dataset` (a real-data config then needs no `policy_data` block)."""
    if config.data.candidates == "dataset":
        return None
    return policy_sampler(policy, tokenizer, config.policy_data,
                          place.key(Purpose.POLICY_DATA), place)
