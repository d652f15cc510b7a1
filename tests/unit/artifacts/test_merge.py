"""`bigrm merge`: weighted averages and ExPO extrapolation of exports, verified; mismatched exports refused."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from bigrm import cli
from bigrm.artifacts import merge
from bigrm.artifacts.export import CONVENTION_KEY, seal
from bigrm.errors import ConfigError, ExportError
from bigrm.kinds import RewardKind
from bigrm.kinds.length import LENGTH_HEAD_KEY
from bigrm.kinds.steps import SEPARATOR_KEY
from tests.helpers.models import make_model_dir


@pytest.fixture(scope="module")
def second_llama(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("llama-b"), "llama", seed=1)


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def edit_config(src, dest, **changes):
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, **changes}))
    seal(dest)  # an export as bigrm writes one: verified, then sealed
    return dest


def test_expo_with_alpha_zero_writes_model_a_exactly(tmp_path, llama_dir, second_llama):
    record = merge.merge([llama_dir, second_llama], tmp_path / "out", alpha=0.0)
    assert record["coefficients"] == [1.0, -0.0] and record["alpha"] == 0.0
    a, got = weights(llama_dir), weights(tmp_path / "out")
    assert a.keys() == got.keys() and all(torch.equal(a[k], got[k]) for k in a)


def test_expo_extrapolates_from_b_through_a(tmp_path, llama_dir, second_llama):
    merge.merge([llama_dir, second_llama], tmp_path / "out", alpha=0.5)
    a, b, got = weights(llama_dir), weights(second_llama), weights(tmp_path / "out")
    for k in a:
        want = (a[k].double() + 0.5 * (a[k].double() - b[k].double())).float()
        assert torch.equal(got[k], want), k


def test_averaging_identical_exports_is_the_identity(tmp_path, llama_dir):
    merge.merge([llama_dir, llama_dir, llama_dir], tmp_path / "out", weights=[1.0, 2.0, 5.0])
    a, got = weights(llama_dir), weights(tmp_path / "out")
    assert all(torch.equal(a[k], got[k]) for k in a)


def test_weights_are_normalised_and_stale_reward_statistics_dropped(tmp_path, llama_dir, second_llama):
    stats = dict(bigrm_reward_mean=1.5, mean=1.5, std=2.0, bigrm_reward_std=2.0, **{LENGTH_HEAD_KEY: {"bias": 0.5}})
    a_dir = edit_config(llama_dir, tmp_path / "a", **stats)
    assert merge.merge([a_dir, second_llama], tmp_path / "out", weights=[3.0, 1.0])["coefficients"] == [0.75, 0.25]
    a, b, got = weights(llama_dir), weights(second_llama), weights(tmp_path / "out")
    key = "score.weight"
    assert torch.equal(got[key], (0.75 * a[key].double() + 0.25 * b[key].double()).float())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert not {"mean", "std", "bigrm_reward_mean", "bigrm_reward_std", LENGTH_HEAD_KEY} & config.keys()
    assert config[merge.MERGED_FROM_KEY]["models"] == [str(a_dir), str(second_llama)]


def test_the_command_line_merges_and_prints_the_sum(tmp_path, llama_dir, second_llama, capsys):
    assert cli.merge_main(["--models", str(llama_dir), str(second_llama), "--out", str(tmp_path / "o")]) == 0
    assert f"merged 0.5·{llama_dir} + 0.5·{second_llama} → {tmp_path / 'o'} (verified)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("weights", "alpha", "n", "message"),
    [
        (None, 0.5, 3, "exactly two --models"),
        ([1.0, 1.0], 0.5, 2, "no --weights"),
        ([1.0], None, 2, "1 weights for 2 --models"),
        ([1.0, -1.0], None, 2, "must be positive"),
        (None, None, 1, "two exports or more"),
    ],
)
def test_bad_weights_are_refused(weights, alpha, n, message):
    with pytest.raises(ConfigError, match=message):
        merge.coefficients(n, weights, alpha)


def test_mismatched_exports_are_refused_in_one_line(tmp_path, llama_dir, neox_dir, capsys):
    convention = edit_config(llama_dir, tmp_path / "conv", **{CONVENTION_KEY: "eos"})
    steps = edit_config(llama_dir, tmp_path / "steps", **{SEPARATOR_KEY: "\n"})
    eps = edit_config(llama_dir, tmp_path / "eps", rms_norm_eps=1e-3)
    tokens = shutil.copytree(llama_dir, tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tokens)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(tokens)
    cases = [
        (neox_dir, "different architectures (architectures"),
        (eps, "different architectures (rms_norm_eps: 1e-06 vs 0.001)"),
        (convention, f"different reward conventions ({CONVENTION_KEY}: None vs 'eos')"),
        (steps, "different reward kinds (scalar vs steps)"),
        (tokens, "different tokenizers"),
    ]
    for other, message in cases:
        with pytest.raises(ConfigError, match=re.escape(f"{llama_dir} and {other} have {message}")):
            merge.merge([llama_dir, other], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    code = cli.merge_main(["--models", str(llama_dir), str(neox_dir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: bigrm merge:") and err.count("\n") == 1


def test_a_merge_that_does_not_reproduce_its_weights_raises(tmp_path, llama_dir, second_llama, monkeypatch):
    real = RewardKind.plain_rewards
    monkeypatch.setattr(RewardKind, "plain_rewards", lambda *a: real(*a) + 0.01)
    with pytest.raises(ExportError, match="does not reproduce the trained model"):
        merge.merge([llama_dir, second_llama], tmp_path / "out")


def test_an_unsealed_bigrm_export_is_not_merged(tmp_path, llama_dir):
    cut = edit_config(llama_dir, tmp_path / "cut", **{CONVENTION_KEY: "trl"})
    (cut / "bigrm_export.json").unlink()  # its writing was cut short before the seal
    with pytest.raises(ExportError, match="without bigrm_export.json"):
        merge.merge([llama_dir, cut], tmp_path / "out")
    assert not (tmp_path / "out").exists()
