"""Decoding: one jit-compiled sampler with a static KV cache, token masks, DFA
constraints and decoding-time alignment (logit combination of several models).

``generate(model, prompt_tokens, prompt_mask, *, max_new_tokens, ...)`` is the entry point;
see :mod:`alignjax.decoding.sampler` for the semantics. Reward-guided decoding (ARGS,
best-of-N, GenARM) is in :mod:`alignjax.decoding.reward_guided`, grammar-aligned sampling (ASAp)
in :mod:`alignjax.decoding.grammar_aligned`.
"""

from alignjax.decoding.combine import LogitMixture, combine_logits, dera, mixture, proxy_tuning
from alignjax.decoding.constraints import TokenDFA, dfa_from_sequences, token_dfa
from alignjax.decoding.grammar_aligned import ASAp
from alignjax.decoding.processors import sampling_logits, top_k_top_p_filter
from alignjax.decoding.reward_guided import ArgsOutput, BestOfNOutput, args_generate, best_of_n, genarm
from alignjax.decoding.sampler import GenerateOutput, TokenSelector, generate

__all__ = [
    "ASAp", "ArgsOutput", "BestOfNOutput", "GenerateOutput", "LogitMixture", "TokenDFA", "TokenSelector",
    "args_generate", "best_of_n", "combine_logits", "dera", "dfa_from_sequences",
    "genarm", "generate", "mixture", "proxy_tuning", "sampling_logits", "token_dfa", "top_k_top_p_filter",
]
