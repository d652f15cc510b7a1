"""The reward model as its consumers read it, with their own code: TRL (GRPOTrainer's reward-model path, RewardTrainer,
the PPO reward helper), RewardBench's pipeline, OpenRLHF's reward-model loader and dataset, and the model-card
snippet. For an RM trained by bigrm (a real 2-rank ZeRO-3 run) with each real tokenizer family, the consumer's
rewards equal `bigrm score`'s (1e-4, fp32) when the reward convention matches, and so does pairwise accuracy.

Patched, and only because these machines have no GPU: RewardBench's hard-coded `.to("cuda")` becomes a no-op,
OpenRLHF loads in fp32 (it accepts bf16/fp16 only) with sdpa attention, and its ring-attention module (flash-attn
kernels, used only with packed samples) is an empty stand-in.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bigrm import cli
from bigrm.builtin.synthetic import make_rows
from tests.helpers.real_tokenizers import FAMILIES, build_model_dir, hh_chat_pairs
from tests.helpers.runs import launch

pytestmark = pytest.mark.slow
TOL = 1e-4


def pairs(rows: list[dict], chat: bool) -> list[dict]:
    """Synthetic K-ranked rows as pairwise rows (best vs worst), text or conversational."""
    out = []
    for row in rows:
        best, worst = row["ranked_outputs"][0], row["ranked_outputs"][-1]
        if chat:
            out.append({"prompt": [{"role": "user", "content": row["prompt"]}], "chosen": best.strip(),
                        "rejected": worst.strip()})  # fmt: skip
        else:
            out.append({"prompt": row["prompt"], "chosen": best, "rejected": worst})
    return out


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tmp_path_factory) -> dict:
    """A 2-rank ZeRO-3 run on conversational and text rows (synthetic pairs, HH conversations) per tokenizer family."""
    root = tmp_path_factory.mktemp(request.param)
    base = build_model_dir(request.param, root / "base")
    hh = hh_chat_pairs(40)
    files = {
        "chat": write(root / "chat.jsonl", pairs(make_rows(160, 2, 4, 0), chat=True) + hh[:24]),
        "text": write(root / "text.jsonl", pairs(make_rows(160, 2, 4, 1), chat=False)),
        "eval_chat": write(root / "eval_chat.jsonl", pairs(make_rows(24, 2, 4, 2), chat=True) + hh[24:]),
        "eval_text": write(root / "eval_text.jsonl", pairs(make_rows(24, 2, 4, 3), chat=False)),
    }
    out = root / "run"
    launch(
        2, out, "--model.path", str(base), "--data.train_files", f"[{files['chat']},{files['text']}]",
        "--data.eval_files", f"[{files['eval_chat']}]", "--data.max_length", "512", "--max_tokens_per_batch", "2048",
        "--lr", "3e-3", "--epochs", "2", "--log_every", "5", "--report_to", "none",
    )  # fmt: skip
    return {"family": request.param, "model": out / "final", **files}


def bigrm_score(trained: dict, data: str, tmp_path: Path, *flags: str) -> list[list[float]]:
    out = tmp_path / f"{data}-scored.jsonl"
    args = ["--model", str(trained["model"]), "--data", str(trained[data]), "--out", str(out), *flags]
    assert cli.score_main(args) == 0
    return [json.loads(line)["rewards"] for line in out.read_text().splitlines()]


def rows_of(trained: dict, data: str) -> list[dict]:
    return [json.loads(line) for line in trained[data].read_text().splitlines()]


def accuracy(rewards: list[list[float]]) -> float:
    return sum(c > r for c, r in rewards) / len(rewards)


def assert_same(got: list[list[float]], expected: list[list[float]]) -> None:
    assert torch.tensor(got).double() == pytest.approx(torch.tensor(expected).double(), abs=TOL)
    assert accuracy(got) == accuracy(expected)


def classifier(path: Path):
    return AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()


def as_messages(rows: list[dict]) -> list[dict]:
    """Conversational rows with chosen/rejected as message lists, TRL's and OpenRLHF's conversational schema."""
    if not isinstance(rows[0]["prompt"], list):
        return rows
    return [{**r, **{k: [{"role": "assistant", "content": r[k]}] for k in ("chosen", "rejected")}} for r in rows]


def as_pairs(flat: list[float]) -> list[list[float]]:
    return [list(flat[i : i + 2]) for i in range(0, len(flat), 2)]


# ---------------------------------------------------------------------------------------------------- TRL


def grpo_rewards(trained: dict, rows: list[dict], tmp_path: Path) -> list[list[float]]:
    """TRL GRPOTrainer._calculate_rewards with the export as its reward model (reward_funcs=path)."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(trained["model"]))  # never generates here
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), use_cpu=True, report_to=[], per_device_train_batch_size=2,
        num_generations=2, max_completion_length=4, bf16=False,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=policy,
        processing_class=AutoTokenizer.from_pretrained(trained["model"]),
        reward_funcs=str(trained["model"]),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in rows]),
    )
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    completions = [c for r in rows for c in (r["chosen"], r["rejected"])]
    if isinstance(prompts[0], list):
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    inputs = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
    rewards = trainer._calculate_rewards(inputs, prompts, completions, [[0]] * len(prompts))
    return as_pairs(rewards[:, 0].tolist())


def test_trl_grpo_conversational_reads_the_default_convention(trained, tmp_path):
    expected = bigrm_score(trained, "eval_chat", tmp_path)
    assert_same(grpo_rewards(trained, rows_of(trained, "eval_chat"), tmp_path), expected)


def test_trl_grpo_text_prompts_read_the_grpo_convention(trained, tmp_path):
    rows = rows_of(trained, "eval_text")
    got = grpo_rewards(trained, rows, tmp_path)
    assert_same(got, bigrm_score(trained, "eval_text", tmp_path, "--data.reward_convention", "grpo"))


@pytest.mark.parametrize("data", ["eval_chat", "eval_text"])
def test_trl_reward_trainer_tokenises_and_evaluates_alike(trained, data, tmp_path):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    rows = as_messages(rows_of(trained, data))
    args = RewardConfig(
        output_dir=str(tmp_path / "rt"), use_cpu=True, report_to=[], per_device_eval_batch_size=len(rows),
        bf16=False, dataset_num_proc=None,
    )  # fmt: skip
    trainer = RewardTrainer(
        model=str(trained["model"]), args=args, train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows),
    )  # fmt: skip
    expected = bigrm_score(trained, data, tmp_path)
    model = classifier(trained["model"])
    with torch.no_grad():
        got = [
            [model(input_ids=torch.tensor([ex[k]])).logits[0, 0].item() for k in ("chosen_ids", "rejected_ids")]
            for ex in trainer.eval_dataset
        ]
    assert_same(got, expected)
    assert trainer.evaluate()["eval_accuracy"] == pytest.approx(accuracy(expected), abs=1e-6)  # TRL: a float32 mean


def scored_ids(trained: dict, data: str, convention: str) -> list[list[int]]:
    """bigrm's scored sequences of a file's rows, chosen then rejected."""
    from bigrm.data.sequences import scored_sequence

    tok = AutoTokenizer.from_pretrained(trained["model"])
    rows = rows_of(trained, data)
    return [scored_sequence(tok, r["prompt"], r[k], 512, convention).ids for r in rows for k in ("chosen", "rejected")]


def test_trl_ppo_reward_helper_reads_the_default_convention(trained, tmp_path):
    """TRL's `get_reward` (what its PPO trainer scored rollouts with) on right-padded prompt + response ids."""
    from trl.experimental.utils import get_reward

    tok = AutoTokenizer.from_pretrained(trained["model"])
    rows = rows_of(trained, "eval_text")
    seqs = scored_ids(trained, "eval_text", "trl")
    width = max(map(len, seqs))
    batch = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    context = min(len(tok(r["prompt"]).input_ids) for r in rows)
    with torch.no_grad():
        _, rewards, _ = get_reward(classifier(trained["model"]), batch, tok.pad_token_id, context)
    assert_same(as_pairs(rewards.tolist()), bigrm_score(trained, "eval_text", tmp_path))


# ---------------------------------------------------------------------------------------------------- RewardBench


def _load_source(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def rewardbench(monkeypatch):
    """rewardbench's pipeline and dialogue formatting, loaded without the package's __init__ files, which import
    model wrappers written for transformers 4 (rewardbench pins transformers==4.51)."""
    from transformers import BatchEncoding

    root = Path(importlib.util.find_spec("rewardbench").submodule_search_locations[0])
    for name, where in (("rewardbench", root), ("rewardbench.models", root / "models")):
        package = types.ModuleType(name)
        package.__path__ = [str(where)]
        package.REWARD_MODEL_CONFIG = {}  # what rewardbench.utils imports from the models package
        monkeypatch.setitem(sys.modules, name, package)
    pipeline = _load_source("rewardbench.models.pipeline", root / "models" / "pipeline.py")
    utils = _load_source("rewardbench.utils", root / "utils.py")
    original = BatchEncoding.to
    monkeypatch.setattr(BatchEncoding, "to", lambda self, device: original(self, "cpu"))  # its .to("cuda")
    return pipeline.RewardBenchPipeline, utils.prepare_dialogue_from_tokenizer


def test_rewardbench_pipeline_reads_the_default_convention(trained, rewardbench, tmp_path):
    pipeline_cls, prepare_dialogue = rewardbench
    tok = AutoTokenizer.from_pretrained(trained["model"])
    pipe = pipeline_cls("text-classification", classifier(trained["model"]), tok)
    got = []
    for row in rows_of(trained, "eval_chat"):
        example = prepare_dialogue(dict(row), tok)
        got.append([pipe([example[k]])[0, 0].item() for k in ("text_chosen", "text_rejected")])
    assert_same(got, bigrm_score(trained, "eval_chat", tmp_path))


# ---------------------------------------------------------------------------------------------------- model card


def test_model_card_snippet_reads_the_default_convention(trained, tmp_path):
    tok = AutoTokenizer.from_pretrained(trained["model"])
    model = classifier(trained["model"])
    got = []
    for row in rows_of(trained, "eval_chat"):
        rewards = []
        for k in ("chosen", "rejected"):
            conversation = row["prompt"] + [{"role": "assistant", "content": row[k]}]
            inputs = tok.apply_chat_template(conversation, tokenize=True, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                rewards.append(model(**inputs).logits[0, 0].item())
        got.append(rewards)
    assert_same(got, bigrm_score(trained, "eval_chat", tmp_path))


# ---------------------------------------------------------------------------------------------------- OpenRLHF


@pytest.fixture
def openrlhf(monkeypatch):
    ring = types.ModuleType("openrlhf.models.ring_attn_utils")
    ring.gather_and_pad_tensor = ring.unpad_and_slice_tensor = None  # used with packing_samples only
    monkeypatch.setitem(sys.modules, ring.__name__, ring)
    from openrlhf.datasets.reward_dataset import RewardDataset
    from openrlhf.models import get_llm_for_sequence_regression
    from openrlhf.utils import utils

    monkeypatch.setattr(utils, "convert_to_torch_dtype", lambda name: torch.float32)
    return RewardDataset, get_llm_for_sequence_regression


@pytest.mark.parametrize("data", ["eval_chat", "eval_text"])
def test_openrlhf_reads_the_openrlhf_convention_and_normalises(trained, data, openrlhf, tmp_path):
    from datasets import Dataset

    reward_dataset, load = openrlhf
    tok = AutoTokenizer.from_pretrained(trained["model"])
    rows = as_messages(rows_of(trained, data))
    chat = isinstance(rows[0]["prompt"], list)
    data_args = types.SimpleNamespace(
        prompt_key="prompt", chosen_key="chosen", rejected_key="rejected", apply_chat_template=chat
    )
    strategy = types.SimpleNamespace(args=types.SimpleNamespace(data=data_args))
    dataset = reward_dataset(Dataset.from_list(rows), tok, 512, strategy, num_processors=1)
    batch = dataset.collate_fn([dataset[i] for i in range(len(dataset))])  # left-padded, as OpenRLHF trains
    expected = bigrm_score(trained, data, tmp_path, "--data.reward_convention", "openrlhf")
    model = load(str(trained["model"]), "reward", attn_implementation="sdpa").eval()
    assert_same(openrlhf_rewards(model, batch), expected)


def openrlhf_rewards(model, batch) -> list[list[float]]:
    with torch.no_grad():
        chosen, rejected = (model(batch[i], attention_mask=batch[i + 1]).tolist() for i in (0, 2))
    return [list(p) for p in zip(chosen, rejected, strict=True)]


def test_openrlhf_normalize_reward_uses_the_exported_mean_and_std(trained, openrlhf, tmp_path):
    """`--normalize_reward`: OpenRLHF's reward model reads `mean` and `std` from config.json. Its class is built with
    its own constructor here: with transformers 5.24 (OpenRLHF pins 5.15) its from_pretrained leaves those
    non-persistent buffers uninitialised."""
    from openrlhf.models.model import _get_reward_model
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(trained["model"])
    assert (config.mean, config.std) == (config.bigrm_reward_mean, config.bigrm_reward_std)
    config.normalize_reward, config._attn_implementation = True, "sdpa"
    backbone = AutoModel._model_mapping[type(config)]
    model = _get_reward_model(backbone.__base__, backbone, "score")(config)
    model.load_state_dict(load_file(trained["model"] / "model.safetensors"))
    model.eval()
    ids = [torch.tensor([s]) for s in scored_ids(trained, "eval_text", "openrlhf")]
    with torch.no_grad():
        got = [model(i, attention_mask=torch.ones_like(i)).item() for i in ids]
    raw = [r for p in bigrm_score(trained, "eval_text", tmp_path, "--data.reward_convention", "openrlhf") for r in p]
    assert got == pytest.approx([(r - config.mean) / config.std for r in raw], abs=TOL)
    assert model.mean.item() == pytest.approx(config.mean) and model.std.item() == pytest.approx(config.std)
