"""`bigrm.RewardFunction` as TRL's GRPOTrainer calls a reward function: the rewards `bigrm score` writes, for text and
conversational prompts, and two real GRPO steps on the CPU with a tiny policy."""

from __future__ import annotations

import pytest

import bigrm
from tests.unit.inference.test_serve import ranked_rows, scored


def test_reward_function_is_a_trl_reward_function(tmp_path, llama_dir):
    rows = ranked_rows()[:4]
    want = [r for row in scored(tmp_path, llama_dir, rows) for r in row["rewards"]]
    fn = bigrm.RewardFunction(str(llama_dir))
    prompts = [row["prompt"] for row in rows for _ in row["ranked_outputs"]]
    completions = [c for row in rows for c in row["ranked_outputs"]]
    got = fn(prompts=prompts, completions=completions, completion_ids=[[1]] * len(prompts), trainer_state=None)
    assert got == pytest.approx(want, abs=1e-5) and fn.__name__ == "bigrm"
    chat = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "go away"}]
    want = scored(tmp_path, llama_dir, chat)[0]["rewards"]
    conv = fn([chat[0]["prompt"]] * 2, [[{"role": "assistant", "content": c}] for c in ("hello", "go away")])
    assert conv == pytest.approx(want, abs=1e-5)


def left_joined() -> None:
    """What accelerate set up for TRL's trainer (a one-process gloo group and its global state), left as found."""
    import torch.distributed as td
    from accelerate.state import AcceleratorState, PartialState

    if td.is_initialized():
        td.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    assert not PartialState._shared_state


def test_two_grpo_steps_on_the_cpu_with_reward_function(tmp_path, llama_dir):
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llama_dir))
    fn = bigrm.RewardFunction(str(llama_dir))
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), use_cpu=True, report_to=[], per_device_train_batch_size=4,
        num_generations=4, max_completion_length=6, max_steps=2, bf16=False, logging_steps=1, save_strategy="no",
    )  # fmt: skip
    prompts = [{"prompt": p} for p in ("Q: hi", "Q: add 2 and 3.", "write a review:", "tell me")]
    trainer = GRPOTrainer(
        model=policy, processing_class=AutoTokenizer.from_pretrained(llama_dir), reward_funcs=[fn], args=args,
        train_dataset=Dataset.from_list(prompts),
    )  # fmt: skip
    try:
        trainer.train()
    finally:
        left_joined()
    logged = [h for h in trainer.state.log_history if "rewards/bigrm/mean" in h]
    assert trainer.state.global_step == 2 and len(logged) == 2  # logged under the function's __name__
    assert all(torch.isfinite(torch.tensor(h["rewards/bigrm/mean"])) for h in logged)
