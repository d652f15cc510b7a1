"""The trainer: the only module that drives DeepSpeed. Config → engine → steps → eval → metrics.json + final/."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from bigrm import adapters, checkpoint, dist, ds_config, export, flops, pipeline, preemption, tiny
from bigrm import config as config_mod
from bigrm.attention import read_attention_needs, resolve_attn
from bigrm.config import Config
from bigrm.data import mix
from bigrm.evaluate import evaluate
from bigrm.loss import STATS, denominators, metrics, ranking_loss
from bigrm.model import (
    RewardModel,
    compile_blocks,
    load_classifier,
    parameter_counts,
    prepare_tokenizer,
    write_random_init,
)
from bigrm.packing import Step, collate, layout_tokens, plan_epoch
from bigrm.tracking import Tracker


def model_dir(cfg: Config, out: Path, dtype: torch.dtype) -> str:
    """The directory every rank loads: the user's, or random weights (in the training dtype) written once by rank 0."""
    path, random_init = cfg.model.path, cfg.model.random_init
    with dist.main_first():
        if dist.is_main():
            if not path:
                tiny.write_tiny(out / "tiny-llama")
            if not path or random_init:
                write_random_init(path or str(out / "tiny-llama"), str(out / "random-init"), cfg.train.seed, dtype)
    return str(out / "random-init") if (not path or random_init) else path


def plan(cfg: Config, data: pipeline.Dataset) -> list[Step]:
    """Every optimizer step of the run; identical on every rank."""
    t = cfg.train
    sizes = [layout_tokens(g, t.share_prompt) for g in data.train]
    steps = []
    for epoch in range(t.epochs):
        items = mix(data.train_files, data.weights, t.seed + epoch)
        epoch_steps = plan_epoch(
            items,
            sizes,
            budget=t.max_tokens_per_batch,
            world=dist.world(),
            accum=t.micro_batches_per_step,
            window=t.packing_window,
            seed=t.seed,
            epoch=epoch,
        )
        steps += epoch_steps
    return steps[: t.max_steps] if t.max_steps else steps


def plan_fingerprint(cfg: Config, data: pipeline.Dataset, steps: list[Step]) -> dict:
    """What fixes the data order: a resume with any of it changed would silently train on other batches."""
    t = cfg.train
    return {
        "seed": t.seed,
        "epochs": t.epochs,
        "steps": len(steps),
        "max_tokens_per_batch": t.max_tokens_per_batch,
        "micro_batches_per_step": t.micro_batches_per_step,
        "packing_window": t.packing_window,
        "share_prompt": t.share_prompt,
        "train_prompts": len(data.train),
        "train_tokens": sum(g.num_tokens for g in data.train),
        "file_weights": data.weights,
    }


def run(cfg: Config) -> dict:
    import deepspeed
    from transformers import AutoConfig, AutoTokenizer, set_seed
    from transformers.integrations import HfDeepSpeedConfig

    device = dist.init()
    t = cfg.train
    out = Path(t.output_dir)
    stop = preemption.StopRequest(out, device)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        config_mod.dump(cfg, out / "config.yaml")
    dist.barrier()
    set_seed(t.seed)

    cuda = device.type == "cuda"
    bf16 = cfg.model.dtype == "bf16" or (cfg.model.dtype == "auto" and cuda)
    dtype = torch.bfloat16 if bf16 else torch.float32
    # an impossible choice, or a model bigrm cannot run, stops the run before any work
    attn = resolve_attn(cfg.model.attn_impl, cuda, read_attention_needs(cfg.model.path))
    path = model_dir(cfg, out, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer)
    with dist.main_first():  # rank 0 writes the synthetic files and fills the datasets cache first
        if dist.is_main() and not cfg.data.train_files:
            pipeline.write_synthetic(cfg, out)
        data = pipeline.build(cfg, tokenizer, out)
    steps = plan(cfg, data)
    tracker = Tracker(out, len(steps), t.tensorboard)
    for line in data.log:
        tracker.print(line)

    arch = AutoConfig.from_pretrained(path)
    hidden = arch.hidden_size
    ds = ds_config.build(cfg, len(steps), bf16=bf16, cpu=not cuda, hidden_size=hidden)
    # transformers holds this only by weak reference: while it lives, from_pretrained loads straight into ZeRO-3 shards
    keep_alive = HfDeepSpeedConfig(ds) if ds["zero_optimization"]["stage"] == 3 else None  # noqa: F841
    classifier = load_classifier(path, dtype, attn, tokenizer, cfg.model.gradient_checkpointing, cfg.quantization)
    # checkpoints and exports carry the convention, so scoring reads the token the head was trained at
    setattr(classifier.config, export.CONVENTION_KEY, cfg.data.reward_convention)
    settings = None
    if cfg.lora.r:
        adapters.add_lora(classifier, cfg.lora)
        base = str(Path(path).resolve()) if Path(path).is_dir() else path
        settings = adapters.Settings(base, cfg.lora, cfg.quantization)
    if cfg.model.compile:
        compile_blocks(classifier)
    model = RewardModel(classifier, attn)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds
    )
    fingerprint = plan_fingerprint(cfg, data, steps)
    start = 0
    resume_from = checkpoint.resolve_resume(t.resume, out)
    if resume_from is not None:
        meta = checkpoint.load(engine, resume_from)
        if meta["plan"] != fingerprint:
            changed = {k: (meta["plan"].get(k), v) for k, v in fingerprint.items() if meta["plan"].get(k) != v}
            raise checkpoint.CheckpointError(f"cannot resume {resume_from}: the data plan changed {changed}")
        start = meta["step"]
        tracker.print(f"resumed from {resume_from} at step {start} (epoch {meta['epoch']}, step {meta['index']})")
    tracker.bar.update(start)
    verify = export.verification_groups(data.eval or data.train, model.needs.smallest_window)

    def save(n: int) -> None:
        step = steps[n - 1]
        epoch_sum = dist.all_sum(epoch_stats).tolist()  # collective: every rank is here
        meta = {"step": n, "epoch": step.epoch, "index": step.index, "plan": fingerprint, "epoch_stats": epoch_sum}

        def hf_files(dest: Path) -> None:
            engine.module.classifier.config.save_pretrained(dest)
            tokenizer.save_pretrained(dest)
            if settings:
                settings.write(dest)

        verify_ids = [[s.tolist() for s in g.seqs] for g in verify]
        saved = checkpoint.save(engine, out, meta, t.keep_checkpoints, hf_files, verify_ids, settings is not None)
        tracker.print(f"checkpoint: {saved}")

    total, trainable = parameter_counts(model)
    matmul = parameter_counts(model, matmul_only=True)
    peak = flops.peak_tflops(t.peak_tflops, device, bf16)
    tracker.print(
        f"model {path}: attention {attn}, {'bf16' if bf16 else 'fp32'}, ZeRO stage {engine.zero_optimization_stage()}"
        + (", compiled blocks" if cfg.model.compile else "")
        + f", world {dist.world()}, {len(steps)} optimizer steps"
        f"\nparameters {total:,}, trainable {trainable:,} ({100 * trainable / total:.2f}%)"
        + (f", LoRA r={cfg.lora.r}" if cfg.lora.r else "")
        + (f" on a {cfg.quantization.bits}-bit base" if cfg.quantization.bits else "")
    )

    def run_eval(step: int) -> dict:
        engine.eval()
        result = evaluate(
            engine,
            data.eval,
            budget=t.max_tokens_per_batch,
            window=t.packing_window,
            pad_id=tokenizer.pad_token_id,
            device=device,
            cfg=cfg.loss,
            share_prompt=t.share_prompt,
        )
        engine.train()
        tracker.log("eval", result, step)
        return result

    group_sums = [denominators([g], cfg.loss) for g in data.train]  # labels only: computed once, not per step
    window = torch.zeros(len(STATS), dtype=torch.float64, device=device)
    epoch_stats, epoch = torch.zeros_like(window), steps[start - 1].epoch if start else -1
    if start and dist.is_main():  # the resumed epoch's reward statistics so far (summed over ranks)
        epoch_stats += torch.tensor(meta["epoch_stats"], dtype=torch.float64, device=device)
    tokens = np.zeros(4)  # real, processed, budget, model FLOPs
    clock = time.perf_counter()
    engine.train()
    for n, step in enumerate(steps[start:], start + 1):
        if step.epoch != epoch:  # reward statistics for the export describe the final epoch
            epoch, epoch_stats = step.epoch, torch.zeros_like(epoch_stats)
        # the loss is normalised over the whole step's prompts, whatever rank or micro-batch holds them
        members = [i for rank in step.micro_batches for mb in rank for i in mb]
        sums = (sum(group_sums[i][0] for i in members), sum(group_sums[i][1] for i in members))
        for mb in step.micro_batches[dist.rank()]:
            packed = collate([data.train[i] for i in mb], tokenizer.pad_token_id, share_prompt=t.share_prompt)
            pairs = flops.causal_pairs(packed.cu_seqlens, packed.seg_parent)  # on the CPU copy: no device sync
            batch = packed.to(device)
            rewards = engine(batch)
            loss, stats = ranking_loss(rewards, batch, cfg.loss, *sums)
            # DeepSpeed averages over ranks and micro-batches: undo that, the step normalises itself
            engine.backward(loss * dist.world() * t.micro_batches_per_step)
            engine.step()
            window += stats
            epoch_stats += stats
            done = flops.model_flops(batch.real_tokens, pairs, matmul, hidden, arch.num_hidden_layers)
            tokens += (batch.real_tokens, batch.processed_tokens, t.max_tokens_per_batch, done)
        tracker.step()
        # collective, every step; a stop still logs this step's window (the resumed run starts a new one) and saves
        stopping = stop.requested()
        if n % t.log_every == 0 or n == len(steps) or stopping:
            local = torch.cat([window, torch.from_numpy(tokens).to(device)])
            summed = dist.all_sum(local).cpu()
            elapsed = time.perf_counter() - clock
            logged = metrics(summed[: len(STATS)], cfg.loss)
            logged.update(
                lr=engine.get_lr()[0],
                tokens_per_s=summed[len(STATS)].item() / elapsed,
                tokens_per_s_per_gpu=summed[len(STATS)].item() / elapsed / dist.world(),
                padding_efficiency=(summed[len(STATS)] / summed[len(STATS) + 1]).item(),
                budget_fill=(summed[len(STATS)] / summed[len(STATS) + 2]).item(),
                tflops_per_gpu=summed[len(STATS) + 3].item() / elapsed / dist.world() / 1e12,
            )
            if peak:
                logged["mfu"] = logged["tflops_per_gpu"] / peak
            if cuda:  # this rank's high-water mark since the start: what a larger model or budget must fit in
                logged["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            tracker.log("train", logged, n)
            window.zero_()
            tokens[:] = 0
            clock = time.perf_counter()
        paused = time.perf_counter()  # evaluation and saving are not training throughput
        if data.eval and t.eval_every and n % t.eval_every == 0 and n != len(steps):
            run_eval(n)
        if stopping or (t.save_every and n % t.save_every == 0) or n == len(steps):
            save(n)
        clock += time.perf_counter() - paused
        if stopping:
            stop.consume()
            tracker.print(f"stopped at step {n} on request with a complete checkpoint: continue with --resume auto")
            tracker.close()
            dist.shutdown()
            raise preemption.Preempted(f"stopped at step {n}")

    final = run_eval(len(steps)) if data.eval else {"note": "no eval data configured"}
    if dist.is_main():
        (out / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
    if t.export:
        running = metrics(dist.all_sum(epoch_stats).cpu(), cfg.loss)
        stats = {"reward_mean": running["reward_mean"], "reward_std": running["reward_std"]}
        export.export_engine(engine, tokenizer, out / "final", verify, device, dtype, settings, stats)
    tracker.print(f"metrics: {out / 'metrics.json'}" + (f"\nmodel: {out / 'final'}" if t.export else ""))
    tracker.close()
    dist.shutdown()
    return final
