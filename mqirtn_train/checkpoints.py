"""Checkpoints (complete or not, resumable or not) and the final model save, both atomic; the finiteness guard."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
from accelerate.logging import get_logger
from PIL import Image as PILImage
from safetensors.torch import load_file

from modeling_mqirtn.pipeline_mqirtn import save_for_hub
from mqirtn_app.atomic import (
    differing_files,
    file_hashes,
    fsync_dir,
    fsync_file,
    move_files_into,
    staging_folder,
    write_bytes_atomic,
)

from .errors import TrainingStopped


logger = get_logger(__name__)

CHECKPOINT_COMPLETE_FILE = "progress.json"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (those with their progress file written last), oldest first."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        path
        for path in folder.glob("checkpoint-*")
        if path.name.split("-")[1].isdigit() and (path / CHECKPOINT_COMPLETE_FILE).is_file()
    ]
    return sorted(found, key=lambda path: int(path.name.split("-")[1]))


def interrupted_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders without their completion marker (a save that was interrupted): never resumable."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.glob("checkpoint-*")
        if path.is_dir() and path.name.split("-")[1].isdigit() and not (path / CHECKPOINT_COMPLETE_FILE).is_file()
    )


class _DropPerSaveLines(logging.Filter):
    """Drops accelerate's INFO lines about saving / loading states (messages come prefixed with the rank)."""

    _PER_SAVE = re.compile(r"Saving current state to |Loading states from |Loading in \d+ custom states")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not self._PER_SAVE.search(str(record.msg))


def quiet_accelerate_checkpoint_logs() -> None:
    """accelerate logs an INFO line for every file `save_state` / `load_state` writes or reads (six or more per
    checkpoint); the training log keeps one line per checkpoint instead ("Saved checkpoint ...", "Resumed from ...").
    Its warnings still show."""
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)
    accelerator_logger = logging.getLogger("accelerate.accelerator")
    if not any(isinstance(existing, _DropPerSaveLines) for existing in accelerator_logger.filters):
        accelerator_logger.addFilter(_DropPerSaveLines())


def checkpoint_damage(path: Path) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed from (no marker, unreadable marker, files whose content
    hash differs from the marker's manifest), or None when it is complete."""
    marker = path / CHECKPOINT_COMPLETE_FILE
    if not marker.is_file():
        return f"it has no {CHECKPOINT_COMPLETE_FILE} (its save was interrupted)"
    try:
        record = json.loads(marker.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"its {CHECKPOINT_COMPLETE_FILE} is not valid JSON ({error})"
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        return f"its {CHECKPOINT_COMPLETE_FILE} lists no file hashes, so its files cannot be checked"
    pickles = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
    if pickles:
        # Accelerate loads these with full unpickling (code can run); this package never writes or reads them.
        return f"it holds {', '.join(pickles)}, pickled state that is never loaded (it could run code)"
    differing = differing_files(path, files)
    return (
        f"its files differ from those its {CHECKPOINT_COMPLETE_FILE} lists ({', '.join(differing)})"
        if differing
        else None
    )


def checkpoint_record(path: Path) -> dict:
    """The completion marker of a complete checkpoint (`checkpoint_damage(path)` is None): the training progress, the
    learning-rate schedule's state (`lr_scheduler`) and the file hashes, as JSON. `ValueError` when it lacks the
    schedule's state."""
    record = json.loads((path / CHECKPOINT_COMPLETE_FILE).read_text())
    if not isinstance(record.get("lr_scheduler"), dict):
        raise ValueError(
            f"cannot resume from {path}: its {CHECKPOINT_COMPLETE_FILE} lacks the learning-rate schedule's state"
        )
    return record


def check_random_states(path: Path, process_index: int) -> None:
    """`ValueError` unless this process's RNG state file of the checkpoint reads with `weights_only=True` (what
    `load_state` does; it skips an unreadable one with an INFO line, and the run would go on with other random
    numbers than the interrupted one)."""
    from accelerate.utils import load

    name = f"random_states_{process_index}.pkl"
    try:
        states = load(path / name)
    except Exception as error:  # torch's restricted unpickler raises its own UnpicklingError, and others
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"cannot resume from {path}: its {name} does not read as an RNG state with weights_only=True ({first_line})"
        ) from None
    if not isinstance(states, dict) or "torch_manual_seed" not in states:
        raise ValueError(f"cannot resume from {path}: its {name} holds no RNG state")


def text_cache_history_file(process_index: int) -> str:
    """The checkpoint file of one process's frozen-text-cache history (`CachedFrozenTextModel.save_history`)."""
    return f"frozen_text_cache_{process_index}.safetensors"


def save_checkpoint(accelerator, args, progress, lr_scheduler=None, text_cache=None) -> None:
    """`accelerator.save_state` into checkpoints/checkpoint-STEP, then the completion marker (with the content hashes
    of every file) written last and atomically. A folder being re-saved is invalidated first (its marker removed), so a
    crash mid-save never leaves new weights beside the old optimizer/scheduler/RNG state under a valid marker.

    The training progress and `lr_scheduler`'s state go into the marker as JSON (nothing is registered with
    accelerate, whose custom states are pickles loaded with full unpickling); accelerate's own files are safetensors
    and tensors that `load_state` reads with `weights_only=True`. With a frozen-text cache (`text_cache`), each
    process also writes the cache's history, so that a resumed run computes its texts exactly as this one did."""
    output_dir = Path(args.output_dir)
    path = output_dir / "checkpoints" / f"checkpoint-{progress.completed_steps}"
    marker = path / CHECKPOINT_COMPLETE_FILE
    if accelerator.is_main_process and marker.exists():
        marker.unlink()
        fsync_dir(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    if text_cache is not None:
        text_cache.save_history(path / text_cache_history_file(accelerator.process_index))
    accelerator.wait_for_everyone()  # every process's random states are written before the marker lists them
    if accelerator.is_main_process:
        for file in path.rglob("*"):
            if file.is_file():
                fsync_file(file)
        files = {name: digest for name, digest in file_hashes(path).items() if name != CHECKPOINT_COMPLETE_FILE}
        record = {**progress.state_dict(), "files": files}
        if lr_scheduler is not None:
            record["lr_scheduler"] = lr_scheduler.state_dict()
        write_bytes_atomic(marker, json.dumps(record).encode())
        for old in list_checkpoints(output_dir)[: -args.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        # Folders of interrupted saves count for nothing (resume refuses them) but their size: rotated out too.
        interrupted = interrupted_checkpoints(output_dir)
        for old in interrupted:
            shutil.rmtree(old, ignore_errors=True)
        removed = f" (removed the interrupted {', '.join(old.name for old in interrupted)})" if interrupted else ""
        logger.info(f"Saved checkpoint {path}{removed}")
    accelerator.wait_for_everyone()


def last_good_checkpoint_text(output_dir: Path) -> str:
    """A sentence naming the newest complete checkpoint under `output_dir` whose weights are all finite."""
    for checkpoint in reversed(list_checkpoints(output_dir)):
        weights = sorted(checkpoint.glob("model*.safetensors"))
        if (
            weights
            and checkpoint_damage(checkpoint) is None
            and all(
                bool(torch.isfinite(tensor).all())
                for path in weights
                for tensor in load_file(str(path)).values()
                if tensor.is_floating_point()
            )
        ):
            return f"The last checkpoint with finite weights is {checkpoint} (--resume_from_checkpoint {checkpoint})."
    return f"No checkpoint with finite weights in {output_dir / 'checkpoints'}."


@torch.no_grad()
def check_finite_model(model, processor, output_dir: Path, consequence: str = "it was not saved") -> None:
    """Raises `TrainingStopped` unless every parameter and buffer of `model` is finite and so are its query and gallery
    embeddings of a probe batch (a grey image and a short text): a model that cannot embed is never saved, nor
    evaluated (its Recall would score an arbitrary ordering). `consequence` says which, in the message."""
    bad = [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if not bad:
        parameter = next(model.parameters())
        probe = processor(images=[PILImage.new("RGB", (32, 32), (128, 128, 128))], text=["a"], return_tensors="pt")
        pixel_values = probe["pixel_values"].to(parameter.device, parameter.dtype)
        was_training = model.training
        model.eval()
        embeds = (
            model.get_query_features(
                pixel_values=pixel_values,
                input_ids=probe["input_ids"].to(parameter.device),
                attention_mask=probe["attention_mask"].to(parameter.device),
            ).pooler_output,
            model.get_image_features(pixel_values=pixel_values).pooler_output,
        )
        model.train(was_training)
        bad = [
            name
            for name, tensor in zip(("query embeddings", "gallery embeddings"), embeds)
            if not torch.isfinite(tensor).all()
        ]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise TrainingStopped(
            f"The model is not finite ({shown}); {consequence}. {last_good_checkpoint_text(output_dir)}"
        )


def save_model(accelerator, model, processor, folder: Path, output_dir: Path | None = None, complete=None) -> None:
    """Model (safetensors) + processor + code files, loadable with trust_remote_code and by the pipeline.

    complete (`Callable[[Path], None]`, *optional*): writes the files that describe this model (its metrics, card,
        training state) into the staged folder, so they are swapped in with the model, never beside another one.

    Checked first (`check_finite_model`, on every process): a model with non-finite weights or embeddings raises
    `TrainingStopped` naming the last good checkpoint of `output_dir` (default `folder`) and nothing is written.
    Written complete into `folder/.model.partial` and flushed to disk first, then renamed file by file into `folder`:
    a crash while writing leaves the previous model in `folder` intact (and `.model.partial` is discarded next time).
    """
    unwrapped = accelerator.unwrap_model(model)
    check_finite_model(unwrapped, processor, Path(output_dir or folder))
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        staged = staging_folder(folder / "model")
        save_for_hub(unwrapped, processor, staged)
        if complete is not None:
            complete(staged)
        move_files_into(staged, folder)
