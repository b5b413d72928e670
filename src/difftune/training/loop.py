"""The training loop.

`Trainer.run` is the one loop: draw micro-batches, accumulate, step, then the periodic events
(validate, sample, save, log), each one guarded `if` block. Setup, resume and saving live in small
methods around it. Accelerate owns devices and mixed precision; the loop reads like plain PyTorch.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from difftune import __version__
from difftune.checkpoint.state import (
    DISK_FULL,
    TrainerState,
    TrainingState,
    checkpoint_name,
    env_fault_hook,
    newest_save,
    prune_checkpoints,
    resume_latest,
    save_checkpoint,
)
from difftune.config.loading import config_to_dict
from difftune.config.schema import Config
from difftune.data.batch import Batch
from difftune.data.dataset import TrainBatches
from difftune.errors import ConfigError, DiskFullError, TrainingDiverged
from difftune.models import load_model
from difftune.models.base import VAE
from difftune.network import build_network
from difftune.network.textual_inversion import token_notes
from difftune.optim.advice import describe_lr
from difftune.optim.registry import build_optimizer, build_scheduler, effective_lrs
from difftune.optim.scaling import trains_text
from difftune.reporting.metrics import MetricsLog, read_metrics, truncate_metrics
from difftune.reporting.plots import plot_run
from difftune.reporting.progress import Progress
from difftune.reporting.samples import write_sample_grid
from difftune.training.memory import MemoryPlan, memory_plan
from difftune.training.noise import NoiseOptions
from difftune.training.plan import Plan, make_plan
from difftune.training.run_dir import open_run_dir
from difftune.training.step import batch_loss, step_generator
from difftune.training.validation import FixedProbe, ProbeResult

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}




COMPILE_BACKEND = "inductor"
"""torch.compile's backend for train.compile (tests use "eager": dynamo's tracing without code generation)."""


def train(config: Config, resume: str | Path | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Train as configured (or continue the run in `resume`); returns the summary."""
    if resume is not None:
        config = config.model_copy(deep=True)
        config.output.dir = str(resume)
    trainer = Trainer(config, resuming=resume is not None, show_progress=show_progress)
    return trainer.run()


class Trainer:
    def __init__(self, config: Config, resuming: bool = False, show_progress: bool = True, lr_multiplier=None,
                 early_stopping=None, command: str = "train"):
        """`lr_multiplier(step) -> float` replaces the configured schedule (the LR finder's ramp);
        `early_stopping.update(step, val_loss) -> bool` ends the run after a validation (the step finder's
        rule, difftune.tuning.curve.EarlyStopping). The trainer holds the run directory's lock from here
        until `run()` ends or `close()` is called."""
        self.config = config
        self.early_stopping = early_stopping
        self.show_progress = show_progress
        self.clock = time.monotonic  # seconds; save_every_n_minutes reads it (tests give a fake one)
        self.metrics: MetricsLog | None = None  # while train() runs
        self.plan: Plan = make_plan(config)  # data errors surface before any model loads
        self.accelerator = _make_accelerator(config)
        self.run_dir, self.lock, self.notes = open_run_dir(config, resuming, command)
        try:
            self._build(config, resuming, lr_multiplier)
        except BaseException:
            self.lock.release()
            raise

    def _build(self, config: Config, resuming: bool, lr_multiplier) -> None:
        self.memory: MemoryPlan = memory_plan(config, cuda=self.accelerator.device.type == "cuda")
        self.fp8_params, self.block_swap, self.saved_weights = [], None, None
        from difftune.models.registry import check_family_settings

        self.notes += check_family_settings(config)
        self.notes += token_notes(config.network, self.plan.train_records)  # before anything loads
        self.model = load_model(config.model)
        self.objective = self.model.make_objective(config.train)
        self.noise_options = NoiseOptions.from_train(config.train)
        if self.memory.fp8:  # before the network: LyCORIS wraps each layer's casting forward
            from difftune.training.memory.precision import store_in_fp8

            self.fp8_params = store_in_fp8(self.model.parts["denoiser"], self.memory.compute_precision)
        self.network = build_network(self.model, config)
        encoders = list(self.model.text_encoder_roles)
        self._place_modules(encoders)
        # Filled before the denoiser takes the device's memory: the encoders may need it for a while.
        self.text_cache = self._text_cache() if self.memory.cache_text else None
        self.batches = TrainBatches(self.plan.train_records, config.data, config.train.batch_size, config.train.seed)
        self._place_modules([VAE])  # the latent cache too, then the VAE may leave the device
        self.latent_cache, self.latent_build, self.vae_offloaded = None, None, False
        if config.data.cache_latents != "off":
            self._cache_latents()
        self.encode_ahead = None
        frozen_text = self.text_cache is None and not trains_text(self.network.trained_roles())
        if self._encodes_ahead(config, frozen_text):
            from difftune.data.encode_ahead import EncodeAheadBatches

            self.encode_ahead = EncodeAheadBatches(self.batches, self.model, self.accelerator.device,
                                                   self.accelerator.autocast, encode_text=frozen_text)
            self.batches = self.encode_ahead
        self._place_modules([role for role in self.model.parts if role not in encoders and role != VAE])
        self._enable_checkpointing()
        self._compile()
        train = config.train
        groups = self.network.param_groups(effective_lrs(train))  # one LR per trained role, scale_lr applied
        self.notes += getattr(self.network, "notes", [])  # LoRA+ / block LR weights
        self.optimizer = build_optimizer(config, groups)
        self.scheduler = (
            build_scheduler(config, self.optimizer, self.plan.total_steps)
            if lr_multiplier is None
            else torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier.for_groups(self.optimizer.param_groups)
                                                   if hasattr(lr_multiplier, "for_groups") else lr_multiplier)
        )
        # Multi-GPU slots in here: prepare() wraps modules for DDP and the optimizer for AMP scaling.
        prepared = self.accelerator.prepare(*self.network.trained_modules(), self.optimizer)
        self.prepared_optimizer = prepared[-1]
        self.ema = self._make_ema(config)
        self.val_probe = self._probe(self.plan.val_records)
        self.stable_probe = self._probe(self.plan.stable_train_records)
        self.state = TrainerState()
        self.fault_hook = env_fault_hook()
        self.notes += self.model.notes + list(self.memory.notes)
        from difftune.training.option_advice import option_warnings

        self.notes += option_warnings(config, self.model.prediction_type, self.plan.total_steps)
        self.notes += caption_notes(self.model, self.plan.train_records + self.plan.val_records)
        from difftune.training.dataset_manifest import changes, write_manifest

        if resuming:
            changed = changes(self.run_dir.root, self.plan.train_records, self.plan.val_records)
            self.notes += [changed] if changed else []
        write_manifest(self.run_dir.root, self.plan.train_records, self.plan.val_records)
        if resuming:
            self._resume()
            if hasattr(self.optimizer, "train"):
                self.optimizer.train()  # saves before difftune 0.2 held schedule-free state in eval mode

    def close(self) -> None:
        """Release the run directory (run() does this itself when it ends), and the encoding thread."""
        if getattr(self, "encode_ahead", None) is not None:
            self.encode_ahead.close()
        self.lock.release()

    # ----------------------------------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        """Train to the end (or the early stop) and return the summary; the lock is released on any exit."""
        try:
            return self._run()
        except OSError as e:
            if e.errno in DISK_FULL:  # metrics, samples, plots (saves raise their own, fuller message)
                raise DiskFullError(f"no space left on the device of '{e.filename or self.run_dir.root}' at step "
                                    f"{self.state.step}; free space and continue with --resume {self.run_dir.root}") from None
            raise
        finally:
            self.close()

    def _run(self) -> dict[str, Any]:
        cfg, plan, state = self.config, self.plan, self.state
        total = plan.total_steps
        # A resumed run replays the steps after its save: TensorBoard hides what it logged for them before.
        wandb = None
        if cfg.output.wandb:
            from difftune.reporting.wandb_sink import WandbSink

            wandb = WandbSink(self.run_dir.root, cfg.output.wandb_project, cfg.output.wandb_run_name,
                              config_to_dict(cfg))
        metrics = MetricsLog(self.run_dir.root, tensorboard=cfg.output.tensorboard,
                             purge_step=state.step + 1 if state.step else None, wandb=wandb)
        self.metrics = metrics
        progress = Progress(total, initial=state.step, enabled=self.show_progress)
        self._announce(progress)
        self._clock = (time.perf_counter(), state.elapsed_seconds)
        steps_at_start = state.step
        try:
            self._loop(metrics, progress)
            self._save("final")
        except TrainingDiverged as e:
            self._finish(state.step - steps_at_start, diverged=e)
            raise
        finally:
            progress.close()
            metrics.close()
            self.metrics = None
        return self._finish(state.step - steps_at_start)

    def _loop(self, metrics: MetricsLog, progress: Progress) -> None:
        cfg, plan, state = self.config, self.plan, self.state
        total, last_val = plan.total_steps, None
        if state.step == 0 and self.val_probe is not None:
            baseline = self.validate()  # the step-0 point every curve starts from
            last_val = baseline.get("val_loss")
            if self.early_stopping is not None:
                self.early_stopping.update(0, last_val)  # a run that never beats the baseline stops too
            metrics.log({"step": 0, "epoch": 0.0, **baseline})
        losses_since_record: list[float] = []
        self._last_save_clock = self.clock()
        for group in self.step_groups() if state.step < total else ():  # a finished run has nothing left
            loss = self.train_step(group)
            losses_since_record.append(loss)
            epoch_done = state.batch_in_epoch >= plan.batches_per_epoch
            finishing = state.step >= total
            record = {"step": state.step, "epoch": round(state.epoch + state.batch_in_epoch / plan.batches_per_epoch, 4),
                      "loss": loss, **self.current_lrs()}
            if self.ema is not None:
                record["ema_decay"] = self.ema.current_decay(state.step)
            saving = not finishing and _save_due(cfg, state, epoch_done, (self.clock() - self._last_save_clock) / 60)
            eventful = finishing or saving

            if self.val_probe is not None and _due(cfg.validation, state, epoch_done, finishing):
                eventful = True
                record.update(self.validate())
                last_val = record["val_loss"]
                if cfg.output.save_best and state.best_val_step == state.step:
                    self._save("best", with_state=False)  # export only: resume keeps using the latest save
                if self.early_stopping is not None and self.early_stopping.update(state.step, last_val):
                    finishing = True  # ends like a normal run: final samples, final save, summary
                    record["early_stop"] = self.early_stopping.reason
            saving = saving and not finishing  # an early stop ends with the final save, not two at one step
            if cfg.sample.prompts and _due(cfg.sample, state, epoch_done, finishing):
                score = self._sample(checkpoint_name(state.step))
                if score is not None:
                    record["sample_digit_score"] = score
                eventful = True
            if eventful or state.step % cfg.output.log_every_n_steps == 0:
                # The mean since the last record (the loss itself when every step writes one); a save always
                # writes one first, so a resume from it starts a new window, as the uninterrupted run does.
                record["loss"] = sum(losses_since_record) / len(losses_since_record)
                metrics.log(record)  # before saving, so a resume from this save has this step's record
                losses_since_record.clear()
            progress.update(loss, record["lr"], last_val)
            if saving:
                self._save(checkpoint_name(state.step))
                self._last_save_clock = self.clock()
            if finishing:
                break

    # ---------------------------------------------------------------------------------- one step
    def step_groups(self):
        """Endless micro-batch groups (one per optimizer step) from the saved position, crossing epochs.

        The caller advances `state.batch_in_epoch` after each step; the epoch moves on lazily here, so a
        save at the end of an epoch resumes at the start of the next one.
        """
        accum = self.config.train.grad_accum
        while True:
            if self.state.batch_in_epoch >= self.plan.batches_per_epoch:
                self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0
            group = []
            for batch in self.batches.epoch(self.state.epoch, self.state.batch_in_epoch):
                group.append(batch)
                if len(group) == accum:
                    yield group
                    group = []
            if group:  # the last group of an epoch may be shorter
                yield group

    def train_step(self, group: list[Batch]) -> float:
        """One optimizer step over a group of micro-batches, and the run's position advanced past it:
        the one way anything (the loop, the LR finder, tests) trains a step. Returns the mean loss."""
        loss = self.optimizer_step(group)
        self.state.step += 1
        self.state.batch_in_epoch += len(group)
        if self.ema is not None:
            self.ema.update(self.state.step)
        return loss

    def optimizer_step(self, group: list[Batch]) -> float:
        """Forward/backward over the micro-batches of one step, clip, step; returns the mean loss.
        Does not advance the position (train_step does)."""
        cfg, accelerator = self.config, self.accelerator
        text_grad = trains_text(self.network.trained_roles())
        losses = []
        for micro, batch in enumerate(group):
            generator = step_generator(cfg.train.seed, self.state.step, micro)
            loss = batch_loss(self.model, self.objective, batch, generator, device=accelerator.device,
                              autocast=accelerator.autocast, noise_options=self.noise_options, text_grad=text_grad,
                              text_cache=self.text_cache, prior_loss_weight=cfg.train.prior_loss_weight)
            if cfg.optimizer.fused_back_pass:  # it steps inside backward: check before, at a sync per micro-batch
                self._refuse_non_finite([loss.item()])
            # Micro-batches are averaged, so the gradient does not grow with grad_accum.
            accelerator.backward(loss / len(group))
            losses.append(loss.detach())
        # One host transfer per step (not one per micro-batch), before anything steps: a non-finite loss
        # has only made non-finite gradients, which are never applied.
        values = torch.stack(losses).tolist()
        self._refuse_non_finite(values)
        total_loss = 0.0
        for value in values:  # the same float64 sum, in the same order, as before
            total_loss += value / len(group)
        if cfg.train.clip_grad_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            accelerator.clip_grad_norm_(params, cfg.train.clip_grad_norm)
        if not cfg.optimizer.fused_back_pass:  # fused: each parameter already stepped during backward
            self.prepared_optimizer.step()
        self.scheduler.step()
        self.prepared_optimizer.zero_grad(set_to_none=True)
        return total_loss

    def _refuse_non_finite(self, losses: list[float]) -> None:
        bad = next((v for v in losses if not math.isfinite(v)), None)
        if bad is not None:
            raise TrainingDiverged(
                f"loss is {bad} at step {self.state.step + 1} (lr {self.current_lrs()['lr']:.3g})",
                "lower train.lr, enable train.clip_grad_norm, or check mixed precision",
                step=self.state.step + 1,
            )

    def current_lrs(self) -> dict[str, float]:
        lrs = {}
        for i, group in enumerate(self.optimizer.param_groups):
            name = group.get("name", str(i))
            lrs["lr" if i == 0 else f"lr/{name}"] = group["lr"]
        return lrs

    # ------------------------------------------------------------------------------ periodic events
    def evaluate_probe(self, probe: FixedProbe) -> ProbeResult:
        """Per-item losses of any fixed probe under the weights validation sees (the tuners' raw data)."""
        with self._weights_for("validation"), self._vae_on_device():
            return probe.evaluate(self.model, self.objective, self.accelerator.autocast, self.text_cache)

    def validate(self) -> dict[str, float]:
        """Deterministic validation (and stabilized train) loss of the weights validation uses (the EMA's
        with ema.use_for = validation); with an EMA, the other weights' loss too (val_loss_raw or
        val_loss_ema), so the two can be compared."""
        out = {}
        evaluate = lambda probe: probe.evaluate(self.model, self.objective, self.accelerator.autocast,  # noqa: E731
                                                self.text_cache).loss
        with self._weights_for("validation"), self._vae_on_device():  # a probe encodes its images the first time
            if self.val_probe is not None:
                out["val_loss"] = evaluate(self.val_probe)
                if self.state.best_val_loss is None or out["val_loss"] < self.state.best_val_loss:
                    self.state.best_val_loss, self.state.best_val_step = out["val_loss"], self.state.step
            if self.stable_probe is not None:
                out["stable_train_loss"] = evaluate(self.stable_probe)
        if self.ema is not None and self.val_probe is not None:
            other = "raw" if self._uses_ema("validation") else "ema"
            with self._weights_for("validation", other=True), self._vae_on_device():
                out[f"val_loss_{other}"] = evaluate(self.val_probe)
        return out

    def _sample(self, name: str) -> float | None:
        """The sample grid; returns the digit score of its images (reporting/digit_score.py) when every
        prompt names a digit, as the demo's do, else None."""
        # Samples run the pipeline's own text encoding: offloaded encoders come to the device meanwhile.
        encoders = self.text_cache.encoders_on_device() if self.text_cache is not None else contextlib.nullcontext()
        with self._weights_for("samples"), encoders, self._vae_on_device():
            images = write_sample_grid(
                self.model, self.config.sample, self.config.data.resolution,
                self.run_dir.samples / f"{name}.png", title=f"{name}  seed {self.config.sample.seed}",
            )
        if self.metrics is not None:
            self.metrics.log_image("samples", self.run_dir.samples / f"{name}.png", self.state.step)
        from difftune.reporting.digit_score import digit_score

        return digit_score(images, self.config.sample.prompts)

    def _save(self, name: str, with_state: bool = True) -> None:
        """Training state as trained (written first), then the export with the weights users should get."""
        output = self.config.output
        self.state.elapsed_seconds = self._elapsed()
        metadata = self._metadata()

        def export(directory: Path) -> None:
            dtype = SAVE_DTYPES[output.save_precision]
            # "best" was chosen by validation's weights: those are its main files
            purpose = "validation" if name == "best" else "export"
            with self._weights_for(purpose):
                self.network.export(directory, self.model, metadata, dtype)
            if self.ema is not None:  # both weights are written: the other ones in a subfolder
                other = directory / ("raw" if self._uses_ema(purpose) else "ema")
                other.mkdir()
                with self._weights_for(purpose, other=True):
                    self.network.export(other, self.model, {**metadata, "difftune_weights": other.name}, dtype)

        trainable = self.network.state_dict()
        if self.ema is not None:
            trainable = {**trainable, **self.ema.state_dict()}
            self.state.ema_updates = self.ema.updates
        state = (TrainingState(trainable, self.optimizer, self.scheduler, self.state)
                 if output.save_state and with_state else None)
        save_checkpoint(self.run_dir.checkpoints, name, export=export, state=state, fault_hook=self.fault_hook)
        if output.save_last_n:
            prune_checkpoints(self.run_dir.checkpoints, output.save_last_n)

    def _elapsed(self) -> float:
        """Wall time of the whole run so far, over every session of it (resumes included)."""
        started, before = getattr(self, "_clock", (time.perf_counter(), self.state.elapsed_seconds))
        return before + time.perf_counter() - started

    def _uses_ema(self, purpose: str) -> bool:
        return self.ema is not None and purpose in self.config.ema.use_for

    def _weights_for(self, purpose: str, other: bool = False):
        """The weights `purpose` (validation, samples, export) uses: the EMA's when ema.use_for names it,
        else the training weights as evaluated (_eval_weights); `other`: the ones it does not use."""
        if self._uses_ema(purpose) != other:
            return self.ema.applied()
        return self._eval_weights()

    def _make_ema(self, config: Config):
        """training/ema.py's average over every parameter the optimizer steps, when ema.enabled."""
        if not config.ema.enabled:
            return None
        from difftune.training.ema import EMAWeights

        e = config.ema
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return EMAWeights(params, e.decay, e.update_every, e.warmup, e.inv_gamma, e.power, e.device)

    @contextlib.contextmanager
    def _eval_weights(self):
        """Schedule-free optimizers keep the weights to evaluate and export apart from the training weights.

        `optimizer.eval()` / `.train()` convert between them by interpolation, which does not round-trip
        exactly in floating point: every validation or save would nudge the training weights, and a
        resumed run would differ from an uninterrupted one. So the training weights are copied aside and
        put back bit for bit afterwards.
        """
        if not (hasattr(self.optimizer, "eval") and hasattr(self.optimizer, "train")):
            yield
            return
        from difftune.training.ema import kept_aside

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        with kept_aside(params):  # on the CPU: no second copy in GPU memory
            self.optimizer.eval()
            try:
                yield
            finally:
                self.optimizer.train()  # its mode flags; kept_aside then puts the training weights back

    # -------------------------------------------------------------------------------------- setup
    def _place_modules(self, roles: list[str]) -> None:
        """Trained modules stay fp32 (train.weight_dtype; mixed precision autocasts them); frozen ones are
        stored as the memory plan says (training/memory: the autocast dtype on GPU, fp32 on the CPU, or
        model.base_precision / vae_precision). Offloaded text encoders stay on the CPU; swapped blocks'
        weights in CPU memory."""
        from difftune.training.memory.precision import frozen_dtype

        device = self.accelerator.device
        trained = {id(m) for m in self.network.trained_modules()}
        trained_dtype = torch.bfloat16 if self.config.train.weight_dtype == "bf16" else torch.float32
        for role in roles:
            module = self.model.parts[role]
            is_trained = id(module) in trained
            dtype = trained_dtype if is_trained else frozen_dtype(self.memory, role, module)
            target = "cpu" if role in self.model.text_encoder_roles and self.memory.offload_encoders else device
            if role == "denoiser" and (self.memory.fp8 or self.memory.blocks_to_swap):
                self._place_denoiser(module, device, dtype)
            else:
                module.to(target, dtype=dtype)
            module.train(is_trained)

    def _place_denoiser(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        """fp8 layers keep their storage; swapped blocks go to CPU memory first, then the rest to the device;
        the graph then saves those weights by recipe (training/memory/saved_weights.py)."""
        from difftune.training import memory
        from difftune.training.memory.block_swap import BlockSwap
        from difftune.training.memory.precision import move
        from difftune.training.memory.saved_weights import SavedWeights

        if self.memory.blocks_to_swap:
            stand_in = device.type != "cuda" and memory.CPU_BLOCK_SWAP_FOR_TESTS
            self.block_swap = BlockSwap.for_model(self.model, self.memory.blocks_to_swap, device, stand_in)
            self.block_swap.prepare(dtype)
        move(module, device, dtype, exclude=self.block_swap.param_ids if self.block_swap else frozenset())
        params = {id(p): p for p in self.fp8_params}
        if self.block_swap:
            params.update({id(p): p for p in self.block_swap.swapped_params()})
        source = self.block_swap.source if self.block_swap else (lambda p: p.data)
        self.saved_weights = SavedWeights(params.values(), source)
        self.saved_weights.install(module)

    def _enable_checkpointing(self) -> None:
        """train.gradient_checkpointing: the denoiser whenever anything trains (gradients flow through it
        even when only a LoRA on it or only a text encoder trains), and every trained text encoder."""
        if not self.config.train.gradient_checkpointing:
            return
        for role in dict.fromkeys(["denoiser", *self.network.trained_roles()]):
            if role not in self.model.parts:
                continue  # textual-inversion vectors: a parameter, no module of the model
            module = self.model.parts[role]
            if role == "denoiser" and self.block_swap is not None:
                module.enable_gradient_checkpointing(self.block_swap.checkpoint_function)  # diffusers, blocks kept in
            elif hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()  # diffusers
            else:
                module.gradient_checkpointing_enable()  # transformers

    def _compile(self) -> None:
        """train.compile: the denoiser's calls go through torch.compile (nn.Module.compile keeps its
        state_dict keys, so saves and LoRA files are unchanged); validation and samples use it too."""
        if not self.config.train.compile:
            return
        if self.block_swap is not None:
            raise ConfigError("train.compile = true with train.blocks_to_swap: the swap's per-block hooks are not "
                              "traced by torch.compile yet; turn one of them off")
        self.model.parts["denoiser"].compile(backend=COMPILE_BACKEND)

    def _text_cache(self):
        """Every caption training can see, encoded once (train and validation images, the empty caption
        of caption dropout); the tuners' probes read from it too."""
        from difftune.data.text_cache import TextEmbeddingCache

        cache = TextEmbeddingCache(self.model, self.accelerator.device, self.accelerator.autocast,
                                   offload=self.memory.offload_encoders)
        records = self.plan.train_records + self.plan.val_records + self.plan.stable_train_records
        cache.add([r.caption for r in records] + [""], show_progress=self.show_progress)
        return cache

    def _cache_latents(self) -> None:
        """data.cache_latents: every training image's latent distribution encoded once (data/latent_cache.py),
        the batches read from it; then the frozen VAE waits on the CPU with data.offload_encoders (it comes
        back to encode the probes' images and decode samples)."""
        from difftune.data.cache_paths import latent_cache_folder
        from difftune.data.latent_cache import CachedBatches, LatentCache

        data = self.config.data
        self.latent_cache = LatentCache(latent_cache_folder(data, self.run_dir.root))
        self.latent_build = self.latent_cache.build(self.model, self.batches.dataset, data.vae_batch_size,
                                                    show_progress=self.show_progress)
        self.batches = CachedBatches(self.batches, self.latent_cache)
        if data.offload_encoders and self.accelerator.device.type != "cpu":
            self.model.parts[VAE].to("cpu")
            self.vae_offloaded = True

    def _encodes_ahead(self, config: Config, frozen_text: bool) -> bool:
        """data.encode_ahead, when there is something to encode: latents not cached, or frozen text."""
        wanted = config.data.encode_ahead
        if wanted == "auto":
            wanted = self.accelerator.device.type == "cpu"
        return bool(wanted) and (config.data.cache_latents == "off" or frozen_text)

    @contextlib.contextmanager
    def _vae_on_device(self):
        """The VAE on the device for the duration (a no-op unless cached latents offloaded it), and no
        encoding ahead meanwhile (data/encode_ahead.py: one module, one thread at a time)."""
        lock = self.encode_ahead.lock if self.encode_ahead is not None else contextlib.nullcontext()
        with lock:
            yield from self._vae_placed()

    def _vae_placed(self):
        if not self.vae_offloaded:
            yield
            return
        vae = self.model.parts[VAE]
        vae.to(self.accelerator.device)
        try:
            yield
        finally:
            vae.to("cpu")

    def _probe(self, records) -> FixedProbe | None:
        if not records:
            return None
        v = self.config.validation
        return FixedProbe(records, self.config.data, v.seed, v.draws_per_image,
                          v.batch_size or self.config.train.batch_size)

    def _resume(self) -> None:
        """Continue from the newest intact save; broken newer ones are named and skipped."""
        from difftune.training.ema import split_state

        saved_ema = {}

        def load_trainable(trainable: dict) -> None:
            network, ema = split_state(trainable)
            self.network.load_state_dict({k: v.to(self.accelerator.device) for k, v in network.items()})
            saved_ema.clear()
            saved_ema.update(ema)

        self.state, folder, skipped = resume_latest(self.run_dir.checkpoints, self.optimizer, self.scheduler,
                                                    load_trainable)
        if self.ema is not None and saved_ema:
            self.ema.load_state_dict(saved_ema, self.state.ema_updates)
        elif self.ema is not None:
            self.ema.restart()
            self.notes.append(f"ema.enabled: {folder.name} has no EMA (it was off); the average starts from its "
                              "weights at step " + str(self.state.step))
        elif saved_ema:
            self.notes.append(f"{folder.name} holds an EMA of its weights; ema.enabled = false leaves it unused")
        truncate_metrics(self.run_dir.metrics, self.state.step)
        self.notes += [f"skipped save {why}" for why in skipped]
        if skipped:
            self.notes.append(f"resuming from {folder.name} (step {self.state.step}), the newest intact save")

    def _announce(self, progress: Progress) -> None:
        plan = self.plan
        progress.write(
            f"difftune {__version__}: {self.model.family} ({self.objective.prediction_type}) on {self.accelerator.device}, "
            f"{self.network.describe()['type']} training, {len(plan.train_records)} train / {len(plan.val_records)} val images, "
            f"{plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps, effective batch {plan.effective_batch_size}, "
            f"{describe_lr(self.config, plan.total_steps)}" + (f" (resuming at step {self.state.step})" if self.state.step else "")
        )
        memory = self._memory_lines()
        if self.text_cache is not None or self.latent_cache is not None or self.memory.fp8 or self.block_swap:
            progress.write("memory: " + "; ".join(f"{k} {v}" for k, v in memory.items()))
        for warning in [*plan.warnings, *self.notes]:
            progress.write(f"warning: {warning}")

    def _memory_lines(self) -> dict[str, str]:
        """The memory plan as doctor prints it, with the cache's size once it is filled."""
        blocks = len(self.model.denoiser_blocks()) if self.block_swap is not None else None
        lines = self.memory.lines(blocks)
        if self.text_cache is not None:
            lines["text embeddings"] += f", {len(self.text_cache)} captions, {self.text_cache.nbytes / 2**20:.1f} MiB"
        if self.latent_cache is not None:
            build, folder = self.latent_build, self.latent_cache.folder
            where = f"on disk in {folder}" if folder is not None else f"in memory, {self.latent_cache.nbytes / 2**20:.1f} MiB"
            lines["latents"] = (f"cached {where}: {build.entries} images/flips, {build.encoded} encoded in "
                                f"{build.seconds:.1f} s, {build.reused} reused; VAE "
                                + ("on the CPU between uses" if self.vae_offloaded else "stays on the device"))
        return lines

    def _metadata(self) -> dict[str, str]:
        return {
            "difftune_version": __version__,
            "base_model": self.config.model.path,
            "step": str(self.state.step),
            "epoch": str(self.state.epoch),
            "resolution": str(self.config.data.resolution),
            "train_images": str(len(self.plan.train_records)),
            "train_samples": str(self.plan.samples_per_epoch),  # with repeats (kohya's ss_num_train_images)
            "planned_epochs": str(self.plan.epochs),
        }

    # ------------------------------------------------------------------------------------- finish
    def _finish(self, steps_done: int, diverged: TrainingDiverged | None = None) -> dict[str, Any]:
        """summary.json and the plots; a diverged run gets them too, marked, with its last good save."""
        self.state.elapsed_seconds = self._elapsed()
        seconds = self.state.elapsed_seconds - self._clock[1]
        records = read_metrics(self.run_dir.metrics)
        plot_run(records, self.run_dir.plots, diverged_at=diverged.step if diverged else None)
        vals = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        last_good = newest_save(self.run_dir.checkpoints) if diverged else None
        summary = {
            "status": "diverged" if diverged else "finished",
            "diverged": {"step": diverged.step, "message": str(diverged),
                         "last_good_checkpoint": str(last_good) if last_good else None} if diverged else None,
            "steps": self.state.step,
            "epochs": round(self.state.epoch + self.state.batch_in_epoch / self.plan.batches_per_epoch, 4),
            "first_val_loss": vals[0][1] if vals else None,
            "final_val_loss": vals[-1][1] if vals else None,
            "final_val_step": vals[-1][0] if vals else None,
            "best_val_loss": min(v for _, v in vals) if vals else None,
            "best_val_step": min(vals, key=lambda sv: sv[1])[0] if vals else None,
            "final_train_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
            "steps_per_second": steps_done / seconds if seconds > 0 else None,
            "wall_seconds": self.state.elapsed_seconds,
            "peak_memory_mb": _peak_memory_mb(self.accelerator.device),
            "device": str(self.accelerator.device),
            "model": self.model.describe(),
            "network": self.network.describe(),
            "memory": self._memory_lines(),
            "config": config_to_dict(self.config),
        }
        from difftune.checkpoint.atomic import atomic_write_json

        atomic_write_json(self.run_dir.summary, summary)
        return summary


def caption_notes(model, records) -> list[str]:
    """A warning when captions are longer than the text encoder reads (they are cut there)."""
    captions = [r.caption for r in records]
    if not captions:
        return []
    counts, limit = model.text_token_counts(captions)
    long = [(n, r) for n, r in zip(counts, records, strict=True) if n > limit]
    if not long:
        return []
    n, example = max(long, key=lambda nr: nr[0])
    return [f"{len(long)} of {len(captions)} captions are longer than the text encoder's {limit} tokens and are cut "
            f"there: what follows is not trained on (longest: {example.path}, {n} tokens). Shorten them, or put "
            "what matters first (with data.shuffle_tags, data.keep_tokens keeps the first tags in place)"]


def _due(section, state: TrainerState, epoch_done: bool, finishing: bool) -> bool:
    """Validation/sample schedule: every N steps, every N epochs, and always at the end."""
    if finishing:
        return True
    if section.every_n_steps and state.step % section.every_n_steps == 0:
        return True
    return bool(epoch_done and section.every_n_epochs and (state.epoch + 1) % section.every_n_epochs == 0)


def _save_due(config: Config, state: TrainerState, epoch_done: bool, minutes_since_save: float) -> bool:
    """Periodic saves: every N steps, every N epochs, N minutes after the last save, from save_from_epoch on."""
    out = config.output
    if state.epoch + int(epoch_done) < out.save_from_epoch:  # epochs complete at this step
        return False
    if out.save_every_n_steps and state.step % out.save_every_n_steps == 0:
        return True
    if out.save_every_n_minutes and minutes_since_save >= out.save_every_n_minutes:
        return True
    return bool(epoch_done and out.save_every_n_epochs and (state.epoch + 1) % out.save_every_n_epochs == 0)


def _make_accelerator(config: Config) -> Accelerator:
    precision = config.train.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision = 'fp16' needs a CUDA GPU; on the CPU use 'bf16' or 'no'")
    # AcceleratorState is a process-wide singleton that refuses a second mixed-precision setting; one
    # process may train several times (tests, find-lr → find-steps → final run). The distributed
    # PartialState (process group) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=precision)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

