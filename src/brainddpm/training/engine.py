"""The training engine: one backend behind one interface, for every model the workflow trains.

Backends (train.backend), behind one `Engine`:

* "deepspeed" (default): `deepspeed.initialize` with a config built from train.* (ZeRO stage
  train.zero_stage). bf16 goes through DeepSpeed's `torch_autocast` section, so the engine itself runs
  the forward under autocast (an autocast opened around the engine is switched *off* by DeepSpeed when
  that section is missing: the run would silently train in fp32).
* "accelerate": HuggingFace Accelerate, the reference study's library: `Accelerator(mixed_precision=
  "bf16")` wraps the model (DDP on several processes), and its `accumulate`, `backward` and
  `clip_grad_norm_` drive the step. Accelerate reads the same RANK/WORLD_SIZE/MASTER_ADDR rendezvous.
* "ddp": plain torch DistributedDataParallel (no wrapper for one process) under torch autocast.

Why Accelerate sits beside the others instead of replacing the loop's branches: the loop's checkpoints
must stay atomic (a manifest written last), load with `weights_only=True` and be refused when the run
changed; Accelerate's `save_state` pickles its RNG and sampler objects and writes in place, so
checkpointing stays in the loop for every backend, and Accelerate is used for what it does well (device
placement, DDP wrapping, mixed precision, accumulation, clipping).

Precision (train.precision: auto = bf16 on GPUs with native bf16, fp32 on CPUs): every backend keeps
fp32 weights ("master weights"), fp32 Adam state and an fp32 EMA; only the forward/backward arithmetic
runs in bf16 under autocast, and gradients are all-reduced in fp32. DeepSpeed's own `bf16` mode, which
casts the module's weights to bf16, is not used: the EMA would then average bf16-rounded weights.

Speed (the `performance` config section, resolved per device into a `Performance`, device.py): `torch.compile`
(mode default or max-autotune-no-cudagraphs), `channels_last_3d` weights and inputs, and GroupNorm run in
bf16 under autocast (models/diffusion.py). They change how fast a step runs, not what it computes beyond
float rounding: the section is not a rerun trigger and a run may resume with other values.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch._dynamo.config as dynamo_config
from torch.nn.parallel import DistributedDataParallel

from brainddpm.config import check_channels_last
from brainddpm.device import EAGER, Performance
from brainddpm.errors import ConfigError
from brainddpm.models.diffusion import use_low_precision_norms
from brainddpm.training.precision import autocast, use_bf16
from brainddpm.training.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """The constants of one training run, fixed before the first step."""
    micro_batch: int  # volumes per process per forward/backward
    gradient_accumulation_steps: int
    world_size: int  # processes
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    bf16: bool

    @property
    def samples_per_step(self) -> int:
        """Volumes per optimizer step over all processes (the global batch)."""
        return self.micro_batch * self.gradient_accumulation_steps * self.world_size

    @property
    def samples_per_process_step(self) -> int:
        return self.micro_batch * self.gradient_accumulation_steps

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"


def plan_run(train_cfg: dict, n_volumes: int, runtime: Runtime) -> RunPlan:
    """Steps per epoch and in total for `n_volumes` training volumes; a ConfigError when not even one step fits."""
    micro_batch, accumulation = train_cfg["micro_batch"], train_cfg["grad_accum"]
    per_process = n_volumes // runtime.world_size  # DistributedSampler with drop_last
    steps_per_epoch = per_process // micro_batch // accumulation
    if steps_per_epoch == 0:
        raise ConfigError(f"config key 'train.micro_batch': the training split has {n_volumes} volumes, fewer than "
                          f"micro_batch x grad_accum x processes = {micro_batch * accumulation * runtime.world_size}")
    total_steps = train_cfg["epochs"] * steps_per_epoch
    if train_cfg["max_steps"]:
        total_steps = min(total_steps, train_cfg["max_steps"])
    return RunPlan(micro_batch, accumulation, runtime.world_size, steps_per_epoch, total_steps,
                   use_bf16(train_cfg["precision"], runtime.device))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay for the update after `step` optimizer steps: min(decay, (1+step)/(10+step)).

    The warm-up of common diffusion trainers (e.g. diffusers' EMAModel): early updates follow the
    weights closely, so the exported EMA does not keep a share of the random initialisation (with a
    fixed 0.9999 over 20k steps, 13.5% of it would remain).
    """
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], net: torch.nn.Module, decay: float) -> None:
    for name, value in net.state_dict().items():
        if value.dtype.is_floating_point:
            ema[name].lerp_(value.float(), 1.0 - decay)
        else:
            ema[name].copy_(value)


def deepspeed_config(train_cfg: dict, plan: RunPlan) -> dict:
    """DeepSpeed's config for this run; bf16 through its `torch_autocast` section (fp32 weights, see above)."""
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "zero_optimization": {"stage": train_cfg["zero_stage"]},
        "gradient_clipping": train_cfg["grad_clip"] or 0.0,
        # empty list: no parameter is marked for bf16 communication, so gradients are all-reduced in fp32
        "torch_autocast": {"enabled": plan.bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
    }


class Engine:
    """One backend behind one interface: `micro_step` runs the forward and backward of one micro-batch and,
    at an accumulation boundary, clips and steps the optimizer. `net` is the bare network (diffusion UNet or
    autoencoder: whose weights are saved and averaged), `objective` its loss (objectives.py), `optimizer` the
    object whose state is checkpointed. After each micro-step the objective finishes its own work
    (`finish_micro_step`: the adversarial loss steps its discriminator)."""

    def __init__(self, train_cfg: dict, plan: RunPlan, runtime: Runtime, net: torch.nn.Module,
                 objective, performance: Performance = EAGER) -> None:
        self.backend, self.plan, self.net, self.objective = train_cfg["backend"], plan, net, objective
        self.grad_clip, self.performance = train_cfg["grad_clip"], performance
        self.accelerator: object | None = None
        self.ddp: DistributedDataParallel | None = None
        if performance.low_precision_norm and plan.bf16:
            use_low_precision_norms(net)
        deepspeed_backend = self.backend == "deepspeed"
        check_channels_last(train_cfg, performance.channels_last)  # also checked with the config, at startup
        if performance.channels_last and not deepspeed_backend:
            net.to(memory_format=torch.channels_last_3d)  # in place, before DDP builds its buckets
        trainable = [p for p in net.parameters() if p.requires_grad]  # a fine-tuning run's frozen ones are not
        optimizer = torch.optim.Adam(trainable, lr=train_cfg["lr"], betas=tuple(train_cfg["betas"]),
                                     weight_decay=train_cfg["weight_decay"])
        if self.backend == "deepspeed":
            import deepspeed

            deepspeed.utils.logger.setLevel(logging.WARNING)
            self.model, self.optimizer, _, _ = deepspeed.initialize(model=net, optimizer=optimizer,
                                                                    config=deepspeed_config(train_cfg, plan))
            if performance.channels_last:  # after: DeepSpeed's broadcast of the weights views them as bytes
                net.to(memory_format=torch.channels_last_3d)  # in place: the optimizer keeps the same parameters
        elif self.backend == "accelerate":
            from accelerate import Accelerator

            self.accelerator = Accelerator(mixed_precision="bf16" if plan.bf16 else "no",
                                           cpu=runtime.device.type == "cpu",
                                           gradient_accumulation_steps=plan.gradient_accumulation_steps)
            self.model, self.optimizer = self.accelerator.prepare(net, optimizer)
        elif runtime.world_size > 1:
            cuda = runtime.device.type == "cuda"
            self.model = DistributedDataParallel(net, device_ids=[runtime.device.index] if cuda else None)
            self.ddp = self.model  # compiling wraps it: keep the DDP object for no_sync
            self.optimizer = optimizer
        else:
            self.model, self.optimizer = net, optimizer
        self.device = runtime.device
        if performance.compile:
            self._compile()

    def _compile(self) -> None:
        """torch.compile the model inside its wrapper (DeepSpeed: `engine.compile()`, which keeps the engine's
        hooks around the compiled module). Compiling happens at the first step; a graph that fails to compile
        runs eagerly instead (dynamo's `suppress_errors`, set around each step only), with a warning, so a
        run never dies of it."""
        mode = self.performance.compile_mode
        kwargs = {} if mode == "default" else {"mode": mode}
        log.info("compiling the network (torch.compile, mode %s): the first step takes a minute or two; "
                 "performance.compile: false runs eagerly", mode)
        if self.backend == "deepspeed":
            self.model.compile(backend=self.performance.compile_backend, compile_kwargs=kwargs)
        else:
            self.model = torch.compile(self.model, backend=self.performance.compile_backend, **kwargs)

    def micro_step(self, x: torch.Tensor, generator: torch.Generator, boundary: bool,
                   context: torch.Tensor | None = None, step: int = 0) -> torch.Tensor:
        """Loss of one micro-batch (detached); the optimizer steps when `boundary`.

        `context`: the micro-batch's condition vectors (a conditional model); `step`: optimizer steps done
        (an adversarial loss starts at a given step)."""
        if self.performance.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if self.performance.compile:
            with dynamo_config.patch(suppress_errors=True):  # a graph that fails to compile runs eagerly
                loss = self._micro_step(x, generator, boundary, context, step)
        else:
            loss = self._micro_step(x, generator, boundary, context, step)
        self.objective.finish_micro_step(boundary)
        return loss

    def _micro_step(self, x: torch.Tensor, generator: torch.Generator, boundary: bool,
                    context: torch.Tensor | None, step: int) -> torch.Tensor:
        def loss_of_batch() -> torch.Tensor:
            return self.objective(self.model, x, context, generator, step)

        if self.backend == "deepspeed":  # the engine autocasts, scales by 1/accumulation, clips and steps
            loss = loss_of_batch()
            self.model.backward(loss)
            self.model.step()
            return loss.detach()
        if self.backend == "accelerate":  # Accelerate autocasts, skips the sync and the step off-boundary
            with self.accelerator.accumulate(self.model):
                if self.accelerator.sync_gradients != boundary:
                    raise RuntimeError("Accelerate's accumulation counter disagrees with the loop's")
                loss = loss_of_batch()
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients and self.grad_clip:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        skip_sync = self.ddp is not None and not boundary
        with self.ddp.no_sync() if skip_sync else nullcontext():
            with autocast(x.device, self.plan.bf16):
                loss = loss_of_batch()
            (loss / self.plan.gradient_accumulation_steps).backward()
        if boundary:
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def close(self) -> None:
        if self.accelerator is not None:  # Accelerate keeps process-wide state; the next run starts clean
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
