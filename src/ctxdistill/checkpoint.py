"""Resumable training state: checkpoints written atomically, and stop signals.

A checkpoint is accelerate's full training state (the trainable weights, optimiser,
scheduler, gradient-accumulation step, every process's RNG states) plus the loop's
:class:`Progress` (optimiser step, epoch, batches consumed, the shuffle generator's
state at the start of the epoch, the method's own state such as its sampling
generators). It is written to ``checkpoints/.step-N.tmp`` and renamed to
``checkpoints/step-N`` only when complete, so a kill during a save never leaves a
broken latest checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shlex
import shutil
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from ctxdistill.config import ConfigError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


@dataclass
class Progress:
    """Where the loop is; registered with accelerate so that it travels in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    epoch_shuffle_state: Optional[torch.Tensor] = None  # the DataLoader generator before `epoch` began
    last_loss: float = math.nan
    fingerprint: str = ""  # the settings that shape training; a checkpoint resumes only the same run
    curves: list = field(default_factory=list)  # the periodic evaluations so far: {"step", "epoch", metrics...}
    method_state: dict = field(default_factory=dict)  # the method's own state at the checkpoint (its generators)
    best: dict = field(default_factory=dict)  # trainer.selection's best evaluation so far: step, epoch, value
    data: list = field(default_factory=list)  # what the data the run read holds (its files' SHA-256s)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:08d}"


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step (half-written ``.tmp`` ones are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    done = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir()) if root.is_dir() else []
    return done[-1] if done else None


def trainable_weights_only(accelerator: Accelerator) -> None:
    """Checkpoint only the parameters that train (a LoRA adapter, not the frozen base model)."""

    def trainable_names(model: torch.nn.Module) -> set[str]:
        return {name for name, p in model.named_parameters() if p.requires_grad}

    def before_save(models, weights, output_dir):
        for model, state in zip(models, weights):
            keep = trainable_names(model)
            for name in [n for n in state if n not in keep]:
                del state[name]

    def before_load(models, input_dir):
        for index, model in enumerate(models):
            suffix = "" if index == 0 else f"_{index}"
            state = load_file(Path(input_dir) / f"model{suffix}.safetensors")
            missing, unexpected = model.load_state_dict(state, strict=False)
            absent = trainable_names(model) & set(missing)
            if absent or unexpected:
                raise RuntimeError(
                    f"checkpoint {input_dir} does not fit this model: missing trainable weights "
                    f"{sorted(absent)[:5]}, unexpected {sorted(unexpected)[:5]}"
                )
        models.clear()  # loaded here; accelerate must not load the trimmed file strictly

    accelerator.register_save_state_pre_hook(before_save)
    accelerator.register_load_state_pre_hook(before_load)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, keep: int) -> Path:
    """Every process writes its part into a temporary directory; rank 0 renames it when all are done."""
    final = checkpoint_dir(run_dir, step)
    staging = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in sorted(p for p in final.parent.glob(f"{PREFIX}*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    log.info("checkpoint saved: %s", final)
    return final


def save_random_states(directory: Path, process: int) -> None:
    """This process's global random generators (python, numpy, torch, CUDA), which the steps after a finished
    round draw dropout and the like from; a run that resumes after the round restores them."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    states["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(states, directory / f"random-states-{process}.pt")


def restore_random_states(directory: Path, process: int) -> None:
    """The generators :func:`save_random_states` saved in ``directory``."""
    path = directory / f"random-states-{process}.pt"
    if not path.is_file():
        log.warning("%s has no random states (older code): the steps after it draw other dropout masks", directory)
        return
    states = torch.load(path, weights_only=False)
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def resume_hint(run_dir: Path) -> str:
    """How to continue a stopped run: its sweep's command into the same sweep directory (Hydra's default one
    holds the launch time, so the same command alone would start the sweep afresh elsewhere), or this run's
    command in its run directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        from ctxdistill.sweeps import running_sweep_command

        return f"resume the sweep with: {running_sweep_command()}"
    args = [a for a in sys.argv[1:] if not a.startswith("hydra.run.dir=")]
    return "resume with: ctxdistill " + " ".join(shlex.quote(a) for a in [*args, f"hydra.run.dir={run_dir}"])


def save_trainable_weights(model: torch.nn.Module, path: Path) -> None:
    """The parameters of ``model`` that train (an adapter, a trained prefix, or every weight)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}, path)


def load_trainable_weights(model: torch.nn.Module, path: Path) -> None:
    """Weights :func:`save_trainable_weights` wrote into ``model`` (the same adapter on the same base)."""
    state = load_file(path)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != names:
        raise ConfigError(
            f"{path} holds other trainable weights than this run's model ({len(set(state) ^ names)} differ); it was "
            f"written by a run with other settings. Delete {path.parent.parent} to train again."
        )
    model.load_state_dict(state, strict=False)


class BestWeights:
    """The best of trainer.selection's evaluations so far: its record in :attr:`Progress.best` (so a checkpoint
    carries it) and its trainable weights in ``checkpoints/best-step-N.safetensors``. At most two such files
    exist: the best so far and the one the latest checkpoint names, which a resumed run goes back to."""

    def __init__(self, run_dir: Path, progress: Progress, higher_is_better: bool):
        self.root = Path(run_dir) / CHECKPOINTS
        self.progress, self.higher_is_better = progress, higher_is_better
        self.checkpointed_step = progress.best.get("step")  # what the checkpoint a run resumed from names

    def path(self, step: int) -> Path:
        return self.root / f"best-{PREFIX}{step:08d}.safetensors"

    def consider(self, record: dict, model: torch.nn.Module, accelerator: Accelerator) -> bool:
        """Keep ``model``'s weights if ``record["value"]`` beats the best so far (a tie keeps the earlier)."""
        value, best = record["value"], self.progress.best
        if not math.isfinite(value) or (
            best and (value <= best["value"] if self.higher_is_better else value >= best["value"])
        ):
            return False
        if accelerator.is_main_process:
            save_trainable_weights(model, self.path(record["step"]))
            self._prune({record["step"], self.checkpointed_step})
        accelerator.wait_for_everyone()
        self.progress.best = record
        return True

    def checkpointed(self, accelerator: Accelerator) -> None:
        """After a checkpoint: only its best is still needed."""
        self.checkpointed_step = self.progress.best.get("step")
        if accelerator.is_main_process:
            self._prune({self.checkpointed_step})

    def restore(self, model: torch.nn.Module) -> None:
        load_trainable_weights(model, self.path(self.progress.best["step"]))

    def _prune(self, keep: set) -> None:
        for path in self.root.glob(f"best-{PREFIX}*.safetensors"):
            if path not in {self.path(step) for step in keep if step is not None}:
                path.unlink()


def remove_checkpoints(run_dir: Path) -> None:
    shutil.rmtree(Path(run_dir) / CHECKPOINTS, ignore_errors=True)


class StopSignals:
    """SIGTERM / SIGUSR1 / SIGUSR2 (SLURM preemption, the time-limit warning, submitit's signal) and
    Ctrl-C (SIGINT) ask the loop to save and stop at the next optimiser step instead of dying mid-step;
    a second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        except ValueError:  # not the main thread: signals stay as they are
            log.warning("not in the main thread: SIGTERM/SIGUSR1 will not checkpoint this run")
        return self

    def _note(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        if self.received is None:
            log.warning(
                "%s: saving a checkpoint at the end of this step, then exiting%s",
                "Ctrl-C" if signum == signal.SIGINT else f"received {signal.Signals(signum).name}",
                " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "",
            )
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def exit(self, signum: int) -> None:
        """Hand the signal to whoever handled it before (submitit requeues the job there), then exit
        with 128 + signal, the status of a process killed by it, which schedulers retry."""
        previous = self._previous.get(signum)
        self.__exit__()
        if callable(previous) and previous is not signal.default_int_handler:  # that one raises KeyboardInterrupt
            previous(signum, None)
        raise SystemExit(128 + signum)
