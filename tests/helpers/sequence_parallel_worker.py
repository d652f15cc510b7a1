"""`deepspeed --num_gpus W tests/helpers/sequence_parallel_worker.py OUT SP`: for each case, one optimizer step's
gradients through DeepSpeed with SP ranks per sequence-parallel group (W / SP groups, data parallel over them) beside
the same step on this process alone, without DeepSpeed or splitting (the reference). Rank 0 saves both to OUT.

Every case packs the same two micro-batches (one per group with 2 groups, accumulated with 1): a prompt-shared group,
a plain one and a stepwise (PRM) one each, so segments straddle the split point and rewards and step values are read
on either rank."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bigrm import dist  # noqa: E402
from bigrm.data.labels import Labels  # noqa: E402
from bigrm.data.packing import collate  # noqa: E402
from bigrm.data.sequences import Group  # noqa: E402
from bigrm.model import sequence_parallel  # noqa: E402
from bigrm.model.reward_model import RewardModel, load_classifier  # noqa: E402

CASES = {  # name: (backbone, attention, share_prompt)
    "llama_shared_sdpa": ("llama", "sdpa", True),
    "llama_eager": ("llama", "eager", False),
    "qwen2_sliding_shared": ("qwen2_sliding", "sdpa", True),
}


def rows(seed: int = 0) -> list[list[Group]]:
    rng = np.random.default_rng(seed)

    def tokens(n: int) -> np.ndarray:
        return rng.integers(3, 400, size=n).astype(np.int64)

    out = []
    for r in range(2):
        prompt = tokens(18 + r)
        shared = Group(tuple(np.concatenate([prompt, tokens(int(rng.integers(3, 10)))]) for _ in range(3)), "shared")
        plain = Group((tokens(9 + r), tokens(14)), "plain")
        question = tokens(10)
        solutions = (np.concatenate([question, tokens(12)]), np.concatenate([question, tokens(7 + r)]))
        steps = (np.array([13, 17, 21]), np.array([12, 16 + r]))  # each step's last token; the last one scored
        labels = Labels(ranks=(-1, -1), steps=((1.0, 0.0, 1.0), (0.0, 1.0)), step_weights=(1.0, 2.0))
        out.append([shared, plain, Group(solutions, "prm", labels, steps)])
    return out


def objective(values: torch.Tensor) -> torch.Tensor:
    """A loss of every value read (rewards, then step ends), the same function on every rank."""
    return (torch.linspace(-1.0, 1.0, len(values)) * values + 0.1 * values**2).sum()


def straddles(batch, size: int) -> bool:
    """Some segment crosses a boundary between the ranks' shares of the (padded) row."""
    total = -(-batch.processed_tokens // size) * size
    cuts = torch.arange(1, size) * (total // size)
    cu = batch.cu_seqlens.long()
    return bool(((cu[:-1, None] < cuts) & (cu[1:, None] > cuts)).any())


def run_case(model_dir: Path, attn: str, share: bool, mpu, sp: int) -> dict:
    import deepspeed
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    batches = [collate(r, pad_id=0, share_prompt=share) for r in rows()]
    reference = RewardModel(load_classifier(str(model_dir), torch.float32, attn, tok), attn)
    sum(objective(reference(b)) for b in batches).backward()
    classifier = load_classifier(str(model_dir), torch.float32, attn, tok)
    model = RewardModel(classifier, attn, split=sequence_parallel.split(classifier, attn, mpu))
    groups, accum = dist.data_parallel_world(), len(batches) // dist.data_parallel_world()
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": accum, "zero_optimization": {}}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu)
    values, mine = [], batches[dist.data_parallel_rank() :: groups]
    for i, batch in enumerate(mine):
        out = engine(batch)
        values.append(out.detach())
        engine.backward(objective(out) * groups * accum)  # as the trainer scales: the sum over both micro-batches
        if i < len(mine) - 1:  # the last step would clear the reduced gradients
            engine.step()
    return {
        "values": values,
        "reference_values": [reference(b).detach() for b in mine],
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "reference_grads": {n: p.grad.clone() for n, p in reference.named_parameters()},
        "straddles": [straddles(b, sp) for b in batches],
        "split": model.split is not None,
    }


def main(out: Path, sp: int) -> None:
    from tests.helpers.models import make_model_dir, write_backbone

    dist.init()
    mpu = dist.join_sequence_parallel(sp)
    root = out.parent / "models"
    with dist.main_first():
        if dist.is_main():
            make_model_dir(root, "llama")
            write_backbone(root / "qwen2_sliding", "qwen2_sliding")
    dirs = {"llama": root / "llama-init", "qwen2_sliding": root / "qwen2_sliding"}
    results = {name: run_case(dirs[arch], attn, share, mpu, sp) for name, (arch, attn, share) in CASES.items()}
    if dist.is_main():
        torch.save(results, out)
    dist.shutdown()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(Path(args[0]), int(args[1]))
