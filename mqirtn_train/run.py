"""The training run: the accelerator, the counters saved with every checkpoint, and `TrainingRun` (dataloader,
optimiser, schedule, resuming, the loop with its non-finite and wall-clock guards, logging, validation)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from mqirtn_app.model_card import HubError, create_hub_repository
from processing.data.registry import get_dataset_spec
from processing.data.transforms import CIRTrainingCollator, set_training_transform

from .checkpoints import (
    CHECKPOINT_COMPLETE_FILE,
    check_random_states,
    checkpoint_damage,
    checkpoint_record,
    last_good_checkpoint_text,
    list_checkpoints,
    quiet_accelerate_checkpoint_logs,
    save_checkpoint,
    save_model,
    text_cache_history_file,
)
from .diagnostics import composition_diagnostics, composition_step_stats, diagnostic_batches
from .errors import TrainingStopped
from .evaluation import evaluate_split, format_table
from .frozen_text import CachedFrozenTextModel
from .model import parameter_groups, set_train_mode
from .versions import library_versions


logger = get_logger(__name__)

TRAINING_STATE_FILE = "training_state.json"


def setup_accelerator(args) -> Accelerator:
    """The accelerator, logging verbosity per process, the seed, the output folder and, with --push_to_hub, the Hub
    repository (token checked and repository created before any work, so a Hub problem never waits for training)."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        # The epoch's shuffle depends only on (seed, epoch): a resumed run sees the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # The baselines leave a tower (image_only) or the text projection unused; DDP must then be told.
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=args.composition in ("image_only", "text_only"))
        ],
    )
    import logging

    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()
    quiet_accelerate_checkpoint_logs()
    # `datasets` draws a bar per cached file (a dozen for the shapes splits) and transformers one per weight load and
    # save, each over in a blink; train.py draws its own bars for the real work.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        if args.push_to_hub:
            try:
                args.hub_model_id = create_hub_repository(
                    args.hub_model_id, token=args.hub_token, private=args.hub_private
                )
            except HubError as error:
                raise SystemExit(
                    f"train.py: --push_to_hub: {error}. Nothing was trained: check --hub_token (or `hf auth login`), the "
                    "network and HF_HUB_OFFLINE, or run without --push_to_hub."
                ) from None
            logger.info(f"Hub repository ready: https://huggingface.co/{args.hub_model_id}")
    accelerator.wait_for_everyone()
    return accelerator


class TrainingProgress:
    """Counters saved with every checkpoint (its progress.json) and into training_state.json."""

    def __init__(self):
        self.completed_steps = 0
        self.samples_seen = 0
        self.skipped_nonfinite_steps = 0
        self.nonfinite_micro_batches = 0  # against --max_nonfinite_total, kept across resumes

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


class TrainingRun:
    """What the training loop works with: the prepared model, optimiser, data and schedule, the counters that are saved
    with every checkpoint (`progress`), and the per-window logging state (summed on the device, read once a window)."""

    def __init__(self, args, accelerator, model, processor, train_dataset, pretrained_prefixes):
        """Dataloader, optimiser (three learning rates), schedule; everything registered for checkpointing."""
        self.args, self.accelerator, self.processor = args, accelerator, processor
        self.output_dir = Path(args.output_dir)
        self.train_dataset = set_training_transform(train_dataset, processor)
        self.collator = CIRTrainingCollator(processor.tokenizer, args.max_text_length)
        dataloader = DataLoader(
            self.train_dataset,
            shuffle=True,
            batch_size=args.per_device_train_batch_size,
            collate_fn=self.collator,
            num_workers=args.dataloader_num_workers,
            drop_last=True,  # the in-batch loss needs full batches of equal size on every process
        )
        if len(dataloader) == 0:
            raise ValueError(
                f"The training set ({len(self.train_dataset)} queries) is smaller than one batch "
                f"(--per_device_train_batch_size {args.per_device_train_batch_size})"
            )
        optimizer = torch.optim.AdamW(parameter_groups(model, args, pretrained_prefixes), lr=args.learning_rate)
        self.model, self.optimizer, self.dataloader = accelerator.prepare(model, optimizer, dataloader)
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.steps_per_epoch = math.ceil(len(self.dataloader) / args.gradient_accumulation_steps)
        self.max_train_steps = args.max_train_steps or args.num_train_epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.max_train_steps / self.steps_per_epoch)
        # Stepped once per optimizer step by this script (not prepared), and saved with the checkpoints.
        self.lr_scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer=self.optimizer,
            num_warmup_steps=args.num_warmup_steps,
            num_training_steps=self.max_train_steps,
        )
        # Saved into each checkpoint's progress.json (JSON), not registered with accelerate (pickles).
        self.progress = TrainingProgress()
        if args.report_to != "none":
            accelerator.init_trackers(
                "runs", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
            )
        self.starting_epoch = self.skip_batches = 0
        self.resumed_rng_state = None
        self.consecutive_nonfinite, self.cycle_nonfinite = 0, False
        self.time_limit_reached, self.best_metric, self.best_step = False, None, None
        self.diagnostics: dict[str, dict[str, float]] = {}
        self.new_window()

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def text_cache(self) -> CachedFrozenTextModel | None:
        """The frozen-text cache in place of the text tower (`--frozen_text_cache`), if any."""
        text_model = self.unwrapped.text_model
        return text_model if isinstance(text_model, CachedFrozenTextModel) else None

    def new_window(self) -> None:
        self.window = {"samples": 0, "time": time.time(), "terms": {}, "count": 0, "composition": {}}

    def resume(self) -> None:
        """Load a complete checkpoint (`--resume_from_checkpoint DIR|latest`) and skip the batches it had seen."""
        if self.args.resume_from_checkpoint is None:
            return
        if self.args.resume_from_checkpoint == "latest":
            checkpoints = []
            for candidate in list_checkpoints(self.output_dir):
                damage = checkpoint_damage(candidate)
                if damage is None:
                    try:
                        checkpoint_record(candidate)
                    except ValueError as error:
                        damage = str(error).split(": ", 1)[-1]
                if damage is None:
                    checkpoints.append(candidate)
                else:
                    logger.warning(f"Not resuming from {candidate}: {damage}")
            if not checkpoints:
                logger.warning(f"No complete checkpoint in {self.output_dir / 'checkpoints'}: starting from scratch")
                return
            checkpoint = checkpoints[-1]
            for unmarked in sorted(
                set((self.output_dir / "checkpoints").glob("checkpoint-*")) - set(list_checkpoints(self.output_dir))
            ):
                logger.warning(
                    f"Not resuming from {unmarked}: it has no {CHECKPOINT_COMPLETE_FILE} (its save was interrupted)"
                )
        else:
            checkpoint = Path(self.args.resume_from_checkpoint)
            damage = checkpoint_damage(checkpoint)
            if damage is not None:
                raise ValueError(f"cannot resume from {checkpoint}: {damage}")
        record = checkpoint_record(checkpoint)
        check_random_states(checkpoint, self.accelerator.process_index)
        # Model, optimizer, RNG states: safetensors or tensors read with `weights_only=True`; nothing else unpickled.
        self.accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
        if self.text_cache is not None:
            history = checkpoint / text_cache_history_file(self.accelerator.process_index)
            if history.is_file():
                try:
                    count = self.text_cache.load_history(history)
                except ValueError as error:
                    raise ValueError(f"cannot resume from {checkpoint}: {error}") from None
                logger.info(f"Frozen-text cache: recomputed the {count} texts of {history.name} in their sub-batches")
            else:
                logger.warning(
                    f"{checkpoint} has no {history.name}: texts are computed anew in other sub-batches, so the run "
                    "continues equal to the interrupted one up to float rounding, not bit for bit"
                )
        self.progress.load_state_dict({key: record[key] for key in self.progress.state_dict() if key in record})
        self.lr_scheduler.load_state_dict(record["lr_scheduler"])
        self.starting_epoch, within = divmod(self.progress.completed_steps, self.steps_per_epoch)
        self.skip_batches = within * self.args.gradient_accumulation_steps
        if self.skip_batches:
            # Starting the resumed epoch's data iterator draws from the global RNG, which the uninterrupted run did at
            # the epoch's start, before this checkpoint: the checkpoint's RNG state is put back once that has happened
            # (`train`), so dropout masks continue exactly where the interrupted run left them.
            self.resumed_rng_state = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                self.resumed_rng_state["cuda"] = torch.cuda.get_rng_state_all()
        logger.info(
            f"Resumed from {checkpoint}: step {self.progress.completed_steps}, {self.progress.samples_seen} samples seen"
        )

    def train(self, validation_data) -> None:
        """The epochs: micro-steps, optimiser steps, logging, checkpoints, validation, the wall-clock guard."""
        args, accelerator, progress = self.args, self.accelerator, self.progress
        total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        logger.info("***** Running training *****")
        logger.info(
            f"  Num queries = {len(self.train_dataset)}, epochs = {self.num_epochs}, optimization steps = {self.max_train_steps}"
        )
        logger.info(
            f"  Batch size per device = {args.per_device_train_batch_size}, total (parallel, accumulation) = {total_batch}"
        )
        self.probe_batches = diagnostic_batches(
            self.train_dataset, self.collator, args.per_device_train_batch_size, args.seed, accelerator.device
        )
        if progress.completed_steps == 0:
            self.measure_composition("start", "composition at step 0")
        self.progress_bar = tqdm(
            range(self.max_train_steps),
            initial=progress.completed_steps,
            disable=not accelerator.is_local_main_process,
            desc="Training",
        )
        self.train_start = time.time()
        for epoch in range(self.starting_epoch, self.num_epochs):
            if progress.completed_steps >= self.max_train_steps or self.time_limit_reached:
                break
            set_train_mode(self.model, args)
            self.dataloader.set_epoch(epoch)
            batches = self.dataloader
            if epoch == self.starting_epoch and self.skip_batches:
                batches = accelerator.skip_first_batches(self.dataloader, self.skip_batches)
            for batch in batches:
                if self.resumed_rng_state is not None:
                    torch.set_rng_state(self.resumed_rng_state["cpu"])
                    if "cuda" in self.resumed_rng_state:
                        torch.cuda.set_rng_state_all(self.resumed_rng_state["cuda"])
                    self.resumed_rng_state = None
                self.micro_step(batch)
                if accelerator.sync_gradients and self.after_optimizer_step(epoch, validation_data):
                    break
            if args.checkpointing_steps == "epoch" and not self.time_limit_reached:
                save_checkpoint(accelerator, args, progress, self.lr_scheduler, self.text_cache)
        self.progress_bar.close()
        self.measure_composition("end", "composition after training")
        if self.best_step is not None:
            logger.info(
                f"Best {args.validation_split} model (step {self.best_step}) saved in {self.output_dir / 'best_model'}"
            )

    def measure_composition(self, moment: str, label: str) -> None:
        frozen = tuple(
            name
            for name, on in (("vision_model", self.args.freeze_vision), ("text_model", self.args.freeze_text))
            if on
        )
        self.diagnostics[moment] = composition_diagnostics(self.unwrapped, self.probe_batches, frozen)
        logger.info(f"{label}: " + ", ".join(f"{k}={v:.4g}" for k, v in self.diagnostics[moment].items()))

    def micro_step(self, batch) -> None:
        """Forward and backward of one batch; a non-finite loss on any process skips the update on all of them."""
        args, accelerator, progress = self.args, self.accelerator, self.progress
        # What the composition does is measured on the batches that end a logging window (no extra pass).
        next_step = progress.completed_steps + 1
        log_step = next_step % args.logging_steps == 0 or next_step == self.max_train_steps
        with accelerator.accumulate(self.model):
            outputs = forward_loss(self.model, batch, log_step)
            loss = outputs.loss
            # Every process must take the same branch (the backward all-reduces).
            finite = (
                accelerator.reduce(torch.isfinite(loss.detach()).float().reshape(1), "sum").item()
                == accelerator.num_processes
            )
            if finite:
                accelerator.backward(loss)
                self.consecutive_nonfinite = 0
            else:
                self.nonfinite_loss()
            if accelerator.sync_gradients:
                if self.cycle_nonfinite:
                    progress.skipped_nonfinite_steps += 1
                else:
                    apply_update(self)
                self.optimizer.zero_grad(set_to_none=True)
                self.cycle_nonfinite = False
        batch_size = batch["pixel_values"].shape[0] * accelerator.num_processes
        progress.samples_seen += batch_size
        self.window["samples"] += batch_size
        if finite:
            self.window["count"] += 1
            for name, value in {"loss": loss, **{f"loss_{k}": v for k, v in outputs.loss_terms.items()}}.items():
                self.window["terms"][name] = self.window["terms"].get(name, 0.0) + value.detach().float()
            if log_step:
                self.window["composition"] = composition_step_stats(outputs)

    def nonfinite_loss(self) -> None:
        """Skips the update; stops the run (`TrainingStopped`) after --max_nonfinite_steps in a row or
        --max_nonfinite_total in all, naming the last checkpoint whose weights are finite."""
        self.cycle_nonfinite = True
        self.consecutive_nonfinite += 1
        self.progress.nonfinite_micro_batches += 1
        step, total = self.progress.completed_steps, self.progress.nonfinite_micro_batches
        logger.warning(f"Non-finite loss at step {step}: skipping the update ({total} non-finite so far)")
        if self.consecutive_nonfinite >= self.args.max_nonfinite_steps:
            reason = (
                f"The loss was non-finite for {self.consecutive_nonfinite} micro-batches in a row (--max_nonfinite_steps "
                f"{self.args.max_nonfinite_steps})"
            )
        elif total >= self.args.max_nonfinite_total:
            reason = f"The loss was non-finite for {total} micro-batches in this run (--max_nonfinite_total {self.args.max_nonfinite_total})"
        else:
            return
        raise TrainingStopped(
            f"{reason}; stopping at step {step}. {last_good_checkpoint_text(self.output_dir)} Lower --learning_rate, "
            "use --mixed_precision no, or check the data."
        )

    def after_optimizer_step(self, epoch: int, validation_data) -> bool:
        """Counters, schedule, logging, checkpoint, validation; True when training must stop (budget or clock)."""
        args, progress = self.args, self.progress
        progress.completed_steps += 1
        self.lr_scheduler.step()
        self.progress_bar.update(1)
        if progress.completed_steps % args.logging_steps == 0 or progress.completed_steps == self.max_train_steps:
            self.log_window(epoch)
        if isinstance(args.checkpointing_steps, int) and progress.completed_steps % args.checkpointing_steps == 0:
            save_checkpoint(self.accelerator, args, progress, self.lr_scheduler, self.text_cache)
        if (
            args.eval_steps
            and progress.completed_steps % args.eval_steps == 0
            and progress.completed_steps < self.max_train_steps
        ):
            self.validate(validation_data)
        if progress.completed_steps >= self.max_train_steps:
            return True
        return self.clock_says_stop()

    def log_window(self, epoch: int) -> None:
        scale = self.unwrapped.logit_scale.detach().item()
        window = self.window
        elapsed = max(time.time() - window["time"], 1e-9)
        logs = {name: float(total) / max(window["count"], 1) for name, total in window["terms"].items()}
        logs.update({name: float(value) for name, value in window["composition"].items()})
        logs.update({f"lr_{group['name']}": group["lr"] for group in self.optimizer.param_groups})
        logs.update(logit_scale=scale, samples_per_second=window["samples"] / elapsed, epoch=epoch)
        self.accelerator.log(logs, step=self.progress.completed_steps)
        logger.info(f"step {self.progress.completed_steps}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
        self.progress_bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.3f}", scale=f"{scale:.1f}")
        self.new_window()

    def validate(self, validation_data) -> None:
        args, step = self.args, self.progress.completed_steps
        metrics, _, _ = evaluate_split(
            self.accelerator, self.model, self.processor, validation_data, args, f"Validation @{step}"
        )
        headline = metrics[get_dataset_spec(args.source).headline_metric]
        logger.info(format_table(f"{args.validation_split} @ step {step}", metrics))
        self.accelerator.log({f"{args.validation_split}/{k}": v for k, v in metrics.items()}, step=step)
        if self.best_metric is None or headline > self.best_metric:
            self.best_metric, self.best_step = headline, step
            save_model(self.accelerator, self.model, self.processor, self.output_dir / "best_model", self.output_dir)
        set_train_mode(self.model, args)

    def clock_says_stop(self) -> bool:
        """The wall-clock safety net, checked every 10 steps; every process stops at the same step (the slowest decides)."""
        args, step = self.args, self.progress.completed_steps
        if not args.max_train_minutes or step % 10:
            return False
        over = float(time.time() - self.train_start > 60 * args.max_train_minutes)
        if self.accelerator.reduce(torch.tensor([over], device=self.accelerator.device), "sum").item() == 0:
            return False
        logger.warning(
            f"--max_train_minutes {args.max_train_minutes} reached: stopping at step {step} of {self.max_train_steps} "
            "(the learning rate had not finished its schedule)"
        )
        self.time_limit_reached = True
        return True

    def summary(self, start_time: float) -> tuple[dict, dict]:
        """The model card's training table and training_state.json (written here, by the main process)."""
        args, progress = self.args, self.progress
        seconds = time.time() - start_time
        samples_per_second = round(progress.samples_seen / max(seconds, 1e-9), 1)
        card = {
            "optimization steps": progress.completed_steps,
            "samples seen": progress.samples_seen,
            "total batch size": args.per_device_train_batch_size
            * self.accelerator.num_processes
            * args.gradient_accumulation_steps,
            "learning rate (new layers / towers / logit scale)": f"{args.learning_rate} / {args.learning_rate * args.tower_lr_multiplier} / {args.logit_scale_lr}",
            "final logit scale": f"{self.unwrapped.logit_scale.item():.2f}",
            "processes": self.accelerator.num_processes,
            "stopped by --max_train_minutes": (
                f"YES: cut short at step {progress.completed_steps} of {self.max_train_steps}"
                if self.time_limit_reached
                else "no"
            ),
            "training wall time (s)": round(seconds, 1),
            "training samples/s": samples_per_second,
        }
        for key in (
            "angle_spread_across_texts",
            "angle_text_share",
            "composition_norm_share",
            "loss_symmetric",
            "loss_symmetric_zero_rotation",
            "loss_symmetric_shuffled_rotation",
            "loss_symmetric_same_rotation",
        ):
            if key in self.diagnostics.get("end", {}):
                card[f"after training: {key}"] = self.diagnostics["end"][key]
        state = {
            **progress.state_dict(),
            "max_train_steps": self.max_train_steps,
            "num_processes": self.accelerator.num_processes,
            "time_limit_reached": self.time_limit_reached,
            "train_seconds": round(seconds, 1),
            "samples_per_second": samples_per_second,
            "libraries": library_versions(),
        }
        card["libraries"] = ", ".join(
            f"{name} {version}" for name, version in state["libraries"].items() if version is not None
        )
        return card, state  # written with the model (`publishing.save_and_publish`)


def forward_loss(model, batch, output_composition: bool):
    """The training forward pass of one batch (tests wrap this to inject faults)."""
    return model(**batch, return_loss=True, output_composition=output_composition)


def apply_update(run: TrainingRun) -> None:
    """Clip, step, and keep the logit scale in its bounds (CLIP-style: on the parameter, never inside forward, so its
    gradient is never frozen at a bound). Tests wrap this to read the gradients."""
    if run.args.max_grad_norm > 0:
        run.accelerator.clip_grad_norm_(run.parameters, run.args.max_grad_norm)
    run.optimizer.step()
    run.unwrapped.clamp_logit_scale_()
