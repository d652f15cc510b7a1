"""The trainer: the only module that drives DeepSpeed. setup → resume → updates (log, evaluate, save) → finish.

`run` is the outline; `Trainer` holds the run's state, declared in its `__init__`, and one method per phase.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch

from bigrm import dist, options, precision
from bigrm.artifacts import checkpoint, export
from bigrm.builtin import tiny
from bigrm.config import Config
from bigrm.data import pipeline
from bigrm.data.packing import Update, collate
from bigrm.evaluation.report import write_for_groups
from bigrm.kinds import RewardKind, for_run, outputs_for
from bigrm.model import adapters, flops, sequence_parallel
from bigrm.model.attention import read_attention_needs, read_config, resolve_attn
from bigrm.model.reward_model import (
    RewardModel,
    check_model_path,
    compile_blocks,
    load_classifier,
    parameter_counts,
    write_random_init,
)
from bigrm.objectives.normaliser import Normaliser
from bigrm.objectives.ranking import Stats, metrics
from bigrm.progress import transformers_bars
from bigrm.training import ds_config, failures, preemption
from bigrm.training.divergence import LossRise, Watch
from bigrm.training.evaluate import evaluate_rewards
from bigrm.training.meter import Meter
from bigrm.training.plan import (
    check_optimisation,
    check_overrides,
    check_resumable,
    optimisation_fingerprint,
    plan,
    plan_fingerprint,
    resumed_line,
    warnings,
)
from bigrm.training.sinks import check_installed, open_sinks
from bigrm.training.tracking import Tracker


def run(cfg: Config) -> dict:
    """Train, evaluate and export; returns the final eval metrics. Whatever happens, the tracker is closed and the
    process group left (with a barrier only when every rank got to the end together)."""
    preemption.terminate_on_signals()
    trainer, together = None, False  # together: every rank reached the same end, so leaving may synchronise
    try:
        trainer = Trainer(cfg, dist.init())
        trainer.setup()
        trainer.resume()
        for n, update in trainer.remaining():
            trainer.train_update(update)
            trainer.after_update(n)  # logs, evaluates and saves at their intervals; a stop request raises Preempted
        result = trainer.finish()
        together = True
        return result
    except preemption.Preempted:
        together = True
        raise
    except preemption.Terminated as err:
        run_id = (trainer.run_id if trainer else "") or None  # set once setup has read output_dir
        good = checkpoint.complete_checkpoints(Path(cfg.train.output_dir), run_id)
        err.checkpoint = good[-1] if good else None
        failures.note(err)
        raise
    except Exception as err:
        failures.note(err)  # before leaving the process group: a rank that sees this one go reads why
        raise
    finally:
        if trainer is not None:
            trainer.close()
        dist.shutdown(failed=not together)


def model_dir(cfg: Config, out: Path, dtype: torch.dtype) -> str:
    """The directory every rank loads: the user's, or random weights (in the training dtype) written once by rank 0."""
    path, random_init = cfg.model.path, cfg.model.random_init
    with dist.main_first():
        if dist.is_main():
            if not path:
                tiny.write_tiny(out / "tiny-llama")
            if not path or random_init:
                src = path or str(out / "tiny-llama")
                outputs = outputs_for(cfg.data, cfg.loss)
                write_random_init(src, str(out / "random-init"), cfg.train.seed, dtype, outputs)
    return str(out / "random-init") if (not path or random_init) else path


class Trainer:
    def __init__(self, cfg: Config, device: torch.device):
        t = cfg.train
        self.cfg, self.t, self.device, self.out = cfg, t, device, Path(t.output_dir)
        self.dtype = precision.training(cfg.model.dtype, device.type == "cuda")
        self.stop = preemption.StopRequest(self.out, device)
        self.watch = Watch(t.max_nonfinite_steps)
        self.rise = LossRise(t.max_loss_ratio)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # this rank's update had a non-finite loss
        self.skipped = 0  # DeepSpeed's skipped optimizer steps so far (overflow)
        # built by setup()
        self.resume_from: Path | None = None  # the checkpoint this run continues
        self.run_id = ""  # recorded in every checkpoint: pruning removes only this run's
        self.tracker: Tracker | None = None  # rank 0's console lines, progress bar, log.jsonl, report_to sinks
        self.tokenizer = None
        self.data: pipeline.Dataset | None = None
        self.kind: RewardKind | None = None  # what the value head means (bigrm.kinds)
        self.updates: list[Update] = []  # every optimizer update of the run, the same on every rank
        self.fingerprint: dict = {}  # what a resume must find unchanged (plan_fingerprint)
        self.optimisation: dict = {}  # and what must not change unless overridden (optimisation_fingerprint)
        self.overridden: list[str] = []  # what a resume changes (train.resume_override), logged at resume
        self.engine = None  # DeepSpeed around RewardModel
        self.mpu = None  # train.sequence_parallel > 1: DeepSpeed's sequence-parallel groups
        self.hf_ds_config = None  # ZeRO-3: kept alive for the whole run (transformers holds it by weak reference)
        self.lora: adapters.Settings | None = None  # what a LoRA export rebuilds its base from
        self.verify: list = []  # held-out groups every checkpoint and export checks itself on
        self.norms: list[Normaliser] = []  # per training prompt: its share of an update's loss denominators
        self.model_flops = None  # (real tokens, causal pairs) → model FLOPs of one forward + backward
        self.meter: Meter | None = None  # the current log window
        # progress, moved by resume() and every update
        self.start = 0  # updates already done
        self.epoch = -1
        self.epoch_stats = Stats.zeros(device)  # the current epoch's statistics: this rank's share

    # setup ------------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        from transformers import set_seed

        check_installed(self.t.report_to)
        # another run's checkpoints in output_dir, or a damaged one to resume: refused before anything is written
        self.resume_from, self.run_id = dist.from_main(
            checkpoint.start, self.t.resume, self.out, self.t.overwrite_output_dir
        )
        if self.t.export:  # not lost after a whole run to a file in its place
            export.check_destination(self.out / "final", "train.export")
        self.optimisation = optimisation_fingerprint(self.cfg)
        check_overrides(self.t.resume_override, self.optimisation)  # a misspelt name is refused on a fresh run too
        if self.resume_from is not None:  # refused before anything is loaded
            saved = checkpoint.read_meta(self.resume_from).get("optimisation")
            self.overridden = check_optimisation(saved, self.optimisation, self.t.resume_override, self.resume_from)
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resume_from is None:  # a resume's config.yaml is written once it is accepted (resume())
                options.dump(self.cfg, self.out / "config.yaml")
        dist.barrier()
        set_seed(self.t.seed)
        # an impossible choice, or a model bigrm cannot run, stops the run before any work
        check_model_path(self.cfg.model.path, self.cfg.data.max_length)
        ds_config.read(self.t, cpu=self.device.type != "cuda")
        attn = resolve_attn(
            self.cfg.model.attn_impl, self.device.type == "cuda", read_attention_needs(self.cfg.model.path)
        )
        self.mpu = sequence_parallel.join(self.t.sequence_parallel, read_config(self.cfg.model.path))  # before the plan
        path = model_dir(self.cfg, self.out, self.dtype)
        self._load_data()
        self._build_engine(path, attn)

    def _load_data(self) -> None:
        # rank 0 writes the synthetic task's files before anyone reads them
        self.tokenizer, self.data = pipeline.load(self.cfg, self.out, dist.main_first(), dist.is_main())
        self.kind = for_run(self.cfg.data, self.cfg.loss, self.data)
        self.updates = plan(self.t, self.data)
        opened = []
        if dist.is_main():
            config = options.to_dict(self.cfg)
            opened = open_sinks(self.t.report_to, self.out, self.t.run_name, config, self.resume_from is not None)
        self.tracker = Tracker(self.out, len(self.updates), opened)
        for line in self.data.log:
            self.tracker.print(line)
        for line in warnings(self.t, self.cfg.loss, self.data, self.updates):
            self.tracker.print(line)

    def _build_engine(self, path: str, attn: str) -> None:
        import deepspeed
        from transformers import AutoConfig
        from transformers.integrations import HfDeepSpeedConfig

        cfg, bf16 = self.cfg, self.dtype == torch.bfloat16
        arch = AutoConfig.from_pretrained(path)
        ds = ds_config.build(
            cfg.train, len(self.updates), bf16=bf16, cpu=self.device.type != "cuda", hidden_size=arch.hidden_size
        )
        # while it lives, from_pretrained loads straight into ZeRO-3 shards
        self.hf_ds_config = HfDeepSpeedConfig(ds) if ds["zero_optimization"]["stage"] == 3 else None
        kind = self.kind
        with transformers_bars():
            classifier = load_classifier(
                path, self.dtype, attn, self.tokenizer, cfg.model.gradient_checkpointing, cfg.quantization, kind.outputs
            )
        # checkpoints and exports carry the convention, so scoring reads the token the head was trained at
        setattr(classifier.config, export.CONVENTION_KEY, cfg.data.reward_convention)
        kind.record(classifier.config)  # and the kind, so exports, scoring and merging read the head as trained
        if cfg.lora.r:
            adapters.add_lora(classifier, cfg.lora, kind.adapters)
            base = str(Path(path).resolve()) if Path(path).is_dir() else path
            self.lora = adapters.Settings(base, cfg.lora, cfg.quantization)
        if cfg.model.compile:
            compile_blocks(classifier)
        model = kind.reward_model(classifier, attn, sequence_parallel.split(classifier, attn, self.mpu))
        self.verify = export.verification_groups(self.data.eval or self.data.train, model.needs.smallest_window)
        trained = [p for p in model.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=trained, config=ds, mpu=self.mpu)
        self.fingerprint = plan_fingerprint(cfg.train, self.data, self.updates)
        matmul = parameter_counts(model, matmul_only=True)
        self.model_flops = partial(
            flops.model_flops, matmul=matmul, hidden=arch.hidden_size, layers=arch.num_hidden_layers
        )
        self._describe(path, attn, model)

    def _describe(self, path: str, attn: str, model: RewardModel) -> None:
        """The console banner, and the same figures as log.jsonl's `setup` row (what benchmarks read)."""
        cfg, dtype, sp = self.cfg, precision.name_of(self.dtype), self.t.sequence_parallel
        world = f"{dist.world()}" + (f" (sequence parallel {sp})" if sp > 1 else "")
        total, trainable = parameter_counts(model)
        stage = self.engine.zero_optimization_stage()
        cpu = " on the CPU (no GPU found)" if self.device.type != "cuda" else ""  # DeepSpeed's words, silenced
        self.tracker.print(
            f"model {path}{cpu}: attention {attn}, {dtype}, ZeRO stage {stage}"
            + (", compiled blocks" if cfg.model.compile else "")
            + f", world {world}, {len(self.updates)} optimizer steps"
            f"\nparameters {total:,}, trainable {trainable:,} ({100 * trainable / total:.2f}%)"
            + (f", LoRA r={cfg.lora.r}" if cfg.lora.r else "")
            + (f" on a {cfg.quantization.bits}-bit base" if cfg.quantization.bits else "")
        )
        setup = {"model": path, "attention": attn, "dtype": dtype, "zero_stage": stage, "compiled": cfg.model.compile}
        setup.update(world=dist.world(), steps=len(self.updates), parameters=total, trainable=trainable)
        self.tracker.record("setup", setup)

    # resume -----------------------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from train.resume's checkpoint, if any: weights, optimizer, RNG, data position, epoch statistics."""
        path, saved = self.resume_from, None
        if path is not None:
            saved = checkpoint.load(self.engine, path)
            check_resumable(saved["plan"], self.fingerprint, path)
            self.start = saved["step"]
            self.tracker.drop_after(self.start)
            self.tracker.print(resumed_line(path, self.start, self.updates))
            for line in self.overridden:
                self.tracker.print(line)
            self.tracker.record("resume", {"checkpoint": str(path), "step": self.start, "changes": self.overridden})
            if dist.is_main():  # what this run uses from here on, the overrides among it
                options.dump(self.cfg, self.out / "config.yaml")
        self.tracker.bar.update(self.start)
        loss = self.cfg.loss  # labels only: computed once
        self.norms = [self.kind.share(g, loss) for g in self.data.train]
        if self.start:
            self.epoch = self.updates[self.start - 1].epoch
            if dist.is_main():  # the resumed epoch's statistics so far (summed over ranks)
                so_far = torch.tensor(saved["epoch_stats"], dtype=torch.float64, device=self.device)
                # checkpoints from before the step statistics (the last fields of Stats) hold fewer values
                so_far = torch.nn.functional.pad(so_far, (0, len(Stats.zeros().stack()) - len(so_far)))
                self.epoch_stats += Stats.unstack(so_far)
        peak = flops.peak_tflops(self.t.peak_tflops, self.device, self.dtype == torch.bfloat16)
        self.meter = Meter(self.device, self.t.max_tokens_per_batch, peak, self.kind)
        self.engine.train()

    def remaining(self) -> Iterator[tuple[int, Update]]:
        """(1-based update number, update) of the updates still to train."""
        return enumerate(self.updates[self.start :], self.start + 1)

    # one update -------------------------------------------------------------------------------------------------

    def train_update(self, update: Update) -> None:
        """This rank's micro-batches of one optimizer update: forward, loss, backward, (at the last) the update."""
        t, data = self.t, self.data
        if update.epoch != self.epoch:  # reward statistics for the export describe the final epoch
            self.epoch, self.epoch_stats = update.epoch, Stats.zeros(self.device)
        # the loss is normalised over the whole update's prompts, whatever rank or micro-batch holds them
        members = [i for rank in update.micro_batches for mb in rank for i in mb]
        norm = sum(self.norms[i] for i in members)
        for mb in update.micro_batches[dist.data_parallel_rank()]:
            packed = collate([data.train[i] for i in mb], self.tokenizer.pad_token_id, share_prompt=t.share_prompt)
            pairs = flops.causal_pairs(packed.cu_seqlens, packed.seg_parent)  # on the CPU copy: no device sync
            batch = packed.to(self.device)
            values = self.engine(batch)  # (N + P,) rewards, then values at step ends; attribute heads (N, A)
            loss, stats, sums = self.kind.loss(values, batch.labels, self.cfg.loss, norm)
            self.nonfinite |= ~torch.isfinite(loss.detach())  # stays on the device: no sync per micro-batch
            # DeepSpeed averages over data-parallel ranks and micro-batches: undo that, the update normalises itself
            self.engine.backward(loss * dist.data_parallel_world() * t.micro_batches_per_step)
            self.engine.step()
            if dist.counts():  # a sequence-parallel group's ranks hold the same statistics: counted once
                self.meter.add(stats, batch, self.model_flops(batch.real_tokens, pairs), sums)
                self.epoch_stats += stats
        self.tracker.step()

    def after_update(self, n: int) -> None:
        """Log, evaluate and save at their intervals; a stop request saves, then raises Preempted."""
        t, last = self.t, n == len(self.updates)
        # collective, every update; a stop still logs this update's window (the resumed run starts a new one) and saves
        stopping = self.stop.requested()
        if n % t.log_every == 0 or last or stopping:
            logged = self.meter.read(self.cfg.loss, self.engine.get_lr()[0])
            self.tracker.log("train", {**logged, "skipped_steps": self.engine.skipped_steps}, n)
            warning = self.rise.observe(n, logged["loss"])
            if warning:
                self.tracker.print(warning)
        unhealthy = self._diverging(n, last)
        with self.meter.paused():  # evaluation and saving are not training throughput
            if self.data.eval and t.eval_every and n % t.eval_every == 0 and not last:
                self.evaluate(n)
            if not unhealthy and (stopping or (t.save_every and n % t.save_every == 0) or last):
                self.save(n)
        if stopping:
            self.stop.consume()
            done = "with a complete checkpoint: continue with --resume auto"
            self.tracker.print(f"stopped at step {n} on request {done}")
            raise preemption.Preempted(f"stopped at step {n}")

    def _diverging(self, n: int, last: bool) -> bool:
        """Collective: whether update n was not finite on any rank (then it is not saved); raises Diverged
        (divergence) when that has lasted train.max_nonfinite_steps updates. DeepSpeed's overflow skips are reported
        as they occur."""
        skipped, self.skipped = self.engine.skipped_steps - self.skipped, self.engine.skipped_steps
        norm = self.engine.get_global_grad_norm()
        # under fp16 a skip lowers the loss scale; otherwise the gradients were not finite
        bad_grads = (skipped and not self.engine.fp16_enabled()) or (norm is not None and not math.isfinite(norm))
        nonfinite = dist.all_sum(self.nonfinite.double().reshape(1)).item() > 0 or bad_grads
        self.nonfinite.zero_()
        if skipped:
            self.tracker.print(f"step {n}: DeepSpeed skipped the optimizer step (overflow; {self.skipped} so far)")
        good = checkpoint.complete_checkpoints(self.out, self.run_id) if nonfinite else []  # saved while healthy
        return self.watch.observe(n, nonfinite, last, str(good[-1]) if good else "none (no checkpoint was saved)")

    # evaluate, save, finish -------------------------------------------------------------------------------------

    def evaluate(self, n: int) -> tuple[dict, torch.Tensor]:
        """The eval metrics (logged) and every eval completion's reward (see evaluate_rewards)."""
        t = self.t
        self.engine.eval()
        result, rewards = evaluate_rewards(
            self.engine,
            self.data.eval,
            budget=t.max_tokens_per_batch,
            window=t.packing_window,
            pad_id=self.tokenizer.pad_token_id,
            device=self.device,
            cfg=self.cfg.loss,
            share_prompt=t.share_prompt,
            kind=self.kind,
        )
        self.engine.train()
        self.tracker.log("eval", result, n)
        return result, rewards

    def save(self, n: int) -> None:
        """Collective: a complete checkpoint after update n."""
        update = self.updates[n - 1]
        epoch_sum = dist.all_sum(self.epoch_stats.stack())
        meta = {
            "step": n,
            "run": self.run_id,
            "epoch": update.epoch,
            "index": update.index,
            "plan": self.fingerprint,
            "optimisation": self.optimisation,
            "epoch_stats": epoch_sum.tolist(),
            "reward_stats": self._reward_stats(epoch_sum),  # what `bigrm export` of it records, as final/ does
        }

        def hf_files(dest: Path) -> None:
            self.engine.module.classifier.config.save_pretrained(dest)
            self.tokenizer.save_pretrained(dest)
            if self.lora:
                self.lora.write(dest)

        verify_ids = [[s.tolist() for s in g.seqs] for g in self.verify]
        try:
            saved = checkpoint.save(
                self.engine, self.out, meta, self.t.keep_checkpoints, hf_files, verify_ids, self.lora is not None
            )
        except preemption.Terminated:
            torn = checkpoint.root(self.out) / checkpoint.tag(n)
            if dist.is_main() and not checkpoint.is_complete(torn):  # never trusted, but not left to look like one
                shutil.rmtree(torn, ignore_errors=True)
            raise
        self.tracker.print(f"checkpoint: {saved}")

    def finish(self) -> dict:
        """The final eval (metrics.json, eval_report/) and, with train.export, the verified export (final/)."""
        out = self.out
        final, rewards = {"note": "no eval data configured"}, None
        if self.data.eval:
            final, rewards = self.evaluate(len(self.updates))
        if dist.is_main():
            (out / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
            if rewards is not None:
                self.tracker.print(write_for_groups(out / "eval_report", self.data.eval, rewards, self.cfg.loss))
        if self.t.export:
            stats = self._reward_stats(dist.all_sum(self.epoch_stats.stack()))
            export.export_engine(
                self.engine, self.tokenizer, out / "final", self.verify, self.device, self.dtype, self.lora, stats
            )
        self.tracker.print(f"metrics: {out / 'metrics.json'}" + (f"\nmodel: {out / 'final'}" if self.t.export else ""))
        return final

    def _reward_stats(self, epoch_sum: torch.Tensor) -> dict:
        """The rewards' mean and std over the epoch's statistics summed over ranks (none: stepwise only)."""
        running = metrics(Stats.unstack(epoch_sum.cpu()), self.cfg.loss)
        return {k: running[k] for k in ("reward_mean", "reward_std") if k in running}

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
