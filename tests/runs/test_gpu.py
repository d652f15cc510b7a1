"""The CUDA path, skipped without a GPU: every attention backend in bf16 against the per-sequence reference (plain
HF forwards of each sequence alone, fp32), packed and with shared prompts, forward and backward, eager and with
compiled blocks; and the trainer on one GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bigrm.data.packing import collate
from bigrm.model.reward_model import RewardModel, compile_blocks, load_classifier
from tests.helpers.groups import random_groups, shared_groups
from tests.helpers.models import SOFTCAPPED, WINDOWED
from tests.helpers.paths import REPO
from tests.helpers.runs import ENV, SMALL, command

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BACKENDS = ["sdpa", "eager", "varlen", "flex", "flash_attn"]
TOL = dict(atol=2e-2, rtol=2e-2)  # bf16 against fp32: about 3 significant digits through two layers


def backend(attn: str) -> str:
    if attn == "flash_attn" and not importlib.util.find_spec("flash_attn"):
        pytest.skip("flash-attn is not installed")
    return attn


def reference(path: str, groups, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """Rewards of each sequence forwarded alone through plain HF, and the gradients of sum(w * rewards)."""
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).cuda()
    rewards = torch.stack(
        [model(input_ids=torch.from_numpy(s)[None].cuda()).logits[0, 0] for g in groups for s in g.seqs]
    )
    (rewards * torch.linspace(-1, 1, len(rewards), device="cuda")).sum().backward()
    return rewards.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


def packed(path: str, attn: str, groups, share: bool, compiled: bool) -> tuple[torch.Tensor, dict]:
    tok = AutoTokenizer.from_pretrained(path)
    classifier = load_classifier(path, torch.bfloat16, attn, tok).cuda()
    if compiled:
        compile_blocks(classifier)
    model = RewardModel(classifier, attn)
    rewards = model(collate(groups, tok.pad_token_id, share_prompt=share).to("cuda"))
    (rewards * torch.linspace(-1, 1, len(rewards), device="cuda")).sum().backward()
    return rewards.detach(), {n: p.grad.float() for n, p in classifier.named_parameters()}


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("arch", ["llama", "neox"])
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("attn", BACKENDS)
def test_backend_matches_per_sequence_reference(arch, share, compiled, attn, request):
    """Against fp32 per-sequence forwards, a packed bf16 step is as close as bf16 per-sequence forwards are: packing
    adds no error of its own. Gradients over the whole model and per weight matrix."""
    path = str(request.getfixturevalue(f"{arch}_dir"))
    for seed in (0, 1):  # two packed lengths: compiled kernels must not be specialised to the first
        groups = shared_groups(seed) if share else random_groups(seed, 400)
        exact, exact_grads = reference(path, groups, torch.float32)
        bf16, bf16_grads = reference(path, groups, torch.bfloat16)
        got, got_grads = packed(path, backend(attn), groups, share, compiled)
        torch.testing.assert_close(got, exact, **TOL)
        assert error(got, exact) <= 2 * error(bf16, exact) + 1e-3
        flat = {
            k: torch.cat([g[n].flatten() for n in exact_grads])
            for k, g in (("got", got_grads), ("bf16", bf16_grads), ("exact", exact_grads))
        }
        assert error(flat["got"], flat["exact"]) <= 2 * error(flat["bf16"], flat["exact"]) + 1e-3
        for name, g in exact_grads.items():
            if g.dim() == 2:  # weight matrices; a norm's few weights carry too few digits in bf16 to compare alone
                assert error(got_grads[name], g) <= 2 * error(bf16_grads[name], g) + 0.01, name


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("family", WINDOWED)
def test_windows_and_softcap_match_per_sequence_reference(backbone_dir, family, attn, share):
    """The backbone matrix's windowed and soft-capped families on every CUDA backend (sequences longer than their
    windows), or refused where the backend cannot compute what the model asks."""
    from bigrm.errors import ConfigError
    from bigrm.model.attention import VARLEN_PARAMS, check_backend, read_attention_needs

    path = str(backbone_dir(family))
    if attn == "varlen" and "window_size" not in VARLEN_PARAMS:
        pytest.skip("this torch's varlen_attn takes no window (refused: test_backbones)")
    if attn in ("sdpa", "varlen") and family in SOFTCAPPED:
        with pytest.raises(ConfigError, match="soft-capping"):
            check_backend(attn, read_attention_needs(path))
        return
    groups = shared_groups(0, prompt_len=(10, 40))
    exact, _ = reference(path, groups, torch.float32)
    bf16, _ = reference(path, groups, torch.bfloat16)
    got, _ = packed(path, backend(attn), groups, share, compiled=False)
    torch.testing.assert_close(got, exact, **TOL)
    assert error(got, exact) <= 2 * error(bf16, exact) + 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["varlen", "flex"])
def test_trainer_on_one_gpu_logs_mfu_and_memory(tmp_path, attn):
    """ZeRO-3 on one GPU in bf16: trains, and logs throughput, MFU against the GPU's peak and peak memory."""
    out = tmp_path / attn
    args = [*SMALL, "--model.attn_impl", attn, "--model.compile", "true", "--export", "false"]
    proc = subprocess.run(command(1, out, *args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert sum(r["loss"] for r in train[-3:]) < sum(r["loss"] for r in train[:3])
    assert all(0 < r["mfu"] < 1 and r["peak_memory_gib"] > 0 and r["tokens_per_s_per_gpu"] > 0 for r in train)
    assert f"attention {attn}, bf16" in proc.stdout
