"""`bigrm.RewardFunction`: a bigrm reward model in process, as TRL's GRPOTrainer calls a reward function
(`reward_funcs=[RewardFunction(path)]`: prompts, completions, completion_ids and the dataset's columns as keywords,
one reward per completion back). The G completions of each prompt are scored as one group, packed and
prompt-shared; text and conversational prompts are read under the convention the model was trained with.
"""

from __future__ import annotations

from dataclasses import replace

from bigrm.data.rows import prompt_key
from bigrm.inference.rewarder import Query, Rewarder


class RewardFunction:
    """`RewardFunction(path, device="cpu", max_length=None, max_tokens_per_batch=16384, normalize=False)`:
    rewards as `bigrm score` writes them; a completion longer than max_length alone gets None (TRL reads NaN)."""

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        dtype: str = "auto",
        attn: str = "auto",
        max_length: int | None = None,
        max_tokens_per_batch: int = 16384,
        normalize: bool = False,
        name: str = "bigrm",
    ) -> None:
        self.rewarder = Rewarder(path, device, dtype, attn)
        data = replace(self.rewarder.data, overlong="skip")
        if max_length is not None:
            data = replace(data, max_length=max_length)
        self.rewarder.configure(data, max_tokens_per_batch, normalize)
        self.__name__ = name  # what TRL logs the reward under

    def __call__(self, prompts: list, completions: list, completion_ids: list | None = None, **kwargs) -> list:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(prompt_key(p), []).append(i)
        queries = [Query(prompts[idx[0]], [completions[i] for i in idx]) for idx in groups.values()]
        rewards: list = [None] * len(prompts)
        for idx, answer in zip(groups.values(), self.rewarder.score(self.rewarder.encode(queries)), strict=True):
            for i, r in zip(idx, answer["rewards"], strict=True):
                rewards[i] = r
        return rewards
