"""Generate synthetic volumes from a trained model (DDPM with all steps, DDIM, or rectified flow).

The n requested volumes are cut into fixed batches of `batch` consecutive indices, and each
sampling job takes whole batches. Volume i starts from noise drawn with seed `base_seed + i` and
every stochastic DDPM step draws its noise from that volume's own generator, so the random draws of
a volume do not depend on the number of jobs. What that guarantees exactly: for the same model,
`sample.batch`, seeds, device type and library versions, a volume is bit-for-bit the same whatever
`sample.jobs` is (tested on CPU, and on GPU by the `gpu` tests). A different batch size, GPU model or
cuDNN/torch version may pick other kernels (bf16 and cuDNN's algorithms depend on the batch shape),
so volumes then agree only up to float rounding. Outputs are clipped to the data range [0, 1]
documented by the data stage (background 0).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import RFlowScheduler

from brainddpm.config import SAMPLERS_OF, scheduler_kind
from brainddpm.data.nifti import grid_affine, save_volume
from brainddpm.data.shards import write_shard
from brainddpm.device import Performance, pick_device, resolve_performance
from brainddpm.errors import BadInputError, BrainDDPMError, CheckpointError, ConfigError
from brainddpm.fileio import atomic_path, sha256_file
from brainddpm.models.autoencoder import decode_latents, load_autoencoder
from brainddpm.models.conditioning import NULL_FILL, CovariateEncoding
from brainddpm.models.diffusion import build_ddim, build_rflow, build_scheduler, use_low_precision_norms
from brainddpm.models.final import load_final
from brainddpm.sampling.plan import read_plan

log = logging.getLogger(__name__)


def part_batches(n: int, batch: int, jobs: int, part: int) -> list[list[int]]:
    """Global batches (lists of volume indices) handled by sampling job `part` of `jobs`."""
    batches = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]
    if jobs > len(batches):
        raise BrainDDPMError(f"sample.jobs={jobs} is more than the {len(batches)} batches of "
                             f"sample.batch={batch} in sample.n={n}; lower sample.jobs")
    return [batches[i] for i in np.array_split(np.arange(len(batches)), jobs)[part]]


def guided_output(model, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None,
                  guidance_scale: float) -> torch.Tensor:
    """The network's output for one step; with a `context`, classifier-free guided as MONAI's
    `DiffusionInferer.sample(cfg=w)` does it: one forward over [null; cond], then uncond + w * (cond - uncond).
    (That sampler draws its step noise from the global RNG; ours needs one generator per volume.)"""
    if context is None:
        return model(x, timesteps=t).float()
    if guidance_scale == 1.0:  # the guided output is the conditional one: no unconditional pass needed
        return model(x, timesteps=t, context=context).float()
    both = model(torch.cat([x, x]), timesteps=torch.cat([t, t]),
                 context=torch.cat([torch.full_like(context, NULL_FILL), context])).float()
    uncond, cond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def denoise(model, scheduler, seeds: list[int], shape, device: torch.device, progress: bool = False,
            context: torch.Tensor | None = None, guidance_scale: float = 1.0, channels: int = 1,
            clip: bool = True) -> torch.Tensor:
    """Run the reverse process for one batch; one generator per volume, so batching does not matter.

    The starting noise of volume i comes from a CPU generator seeded with seeds[i] (the same on any
    device); each DDPM step draws that volume's noise from its own generator on the model's device,
    seeded from (seeds[i], 1). A conditional model gets `context` ([B, 1, dim]) and `guidance_scale`.
    `shape` is spatial; `channels` 1 for images (clipped to [0, 1] at the end), the latent channels for a
    latent model (`clip` False: latents are unbounded).
    """
    from tqdm import tqdm

    x = torch.stack([torch.randn((channels, *shape), generator=torch.Generator().manual_seed(int(s)))
                     for s in seeds])
    x = x.to(device)
    context = None if context is None else context.to(device)
    # step noise from a stream derived from (seed, 1): never a copy of the starting noise
    gens = [torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([int(s), 1]).generate_state(1)[0]))
            for s in seeds]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    steps = scheduler.timesteps
    flow = isinstance(scheduler, RFlowScheduler)
    following = [*steps[1:].tolist(), 0] if flow else []  # rectified flow: each Euler step ends at the next one
    for k, t in enumerate(tqdm(steps, desc="denoising", unit="step", disable=not progress)):
        tt = torch.full((len(seeds),), t.item() if flow else int(t), device=device,
                        dtype=torch.float32 if flow and t.is_floating_point() else torch.long)
        with autocast:
            eps = guided_output(model, x, tt, context, guidance_scale)
        if flow:  # deterministic: no step noise, the whole batch at once
            x = scheduler.step(eps, t.item(), x, following[k])[0]
        else:
            x = torch.cat([scheduler.step(eps[i:i + 1], int(t), x[i:i + 1], generator=g)[0]
                           for i, g in enumerate(gens)])
        if not progress and (k + 1) % max(1, len(steps) // 10) == 0:
            log.info("step %d/%d", k + 1, len(steps))
    return (x.clamp_(0.0, 1.0) if clip else x).cpu()


def make_scheduler(config: dict, sampler: str, ddim_steps: int | None, rflow_steps: int | None = None):
    """The sampling scheduler of `sampler` for a model of `config` (its embedded config): ddpm (all steps) or
    ddim for a DDPM-trained model, rflow for a rectified-flow one; any other pairing is refused, naming both."""
    clip = "latent_shape" not in config["data"]  # images are clipped to [0, 1]; latents are not
    kind = scheduler_kind(config["scheduler"])
    if sampler not in SAMPLERS_OF[kind]:
        raise ConfigError(f"config key 'sample.samplers': the {sampler} sampler cannot sample a model trained with "
                          f"scheduler.kind {kind}; its samplers: {', '.join(SAMPLERS_OF[kind])}")
    if sampler == "rflow":
        if rflow_steps is None:
            raise ConfigError("config key 'sample.rflow_steps': missing (the rflow sampler needs it)")
        flow = build_rflow(config["scheduler"])
        spatial = config["data"].get("latent_shape", [1, *config["data"]["target_shape"]])[1:]
        flow.set_timesteps(int(rflow_steps), input_img_size_numel=int(np.prod(spatial)))
        return flow
    if sampler == "ddim":
        if ddim_steps is None:
            raise ConfigError("config key 'sample.ddim_steps': missing (the ddim sampler needs it)")
        return build_ddim(config["scheduler"], ddim_steps, clip)
    sch = build_scheduler(config["scheduler"], clip)
    sch.set_timesteps(sch.num_train_timesteps)
    return sch


def conditions_for(config: dict, plan_path: Path | None, checkpoint: Path) -> tuple[CovariateEncoding | None, dict]:
    """The model's covariate encoding and the sampling plan it needs (None and {} for an unconditional model)."""
    if "condition" not in config:
        return None, {}
    if plan_path is None:
        raise BadInputError(checkpoint, "a conditional model: sampling needs the plan of requested covariates "
                            "(--plan conditions.json, written by `brainddpm condition-plan`)")
    encoding, plan = CovariateEncoding.from_dict(config["condition"]), read_plan(plan_path)
    if plan["encoding"]["covariates"] != encoding.to_dict()["covariates"]:
        raise BadInputError(plan_path, f"the plan was made for another model's covariate encoding than {checkpoint}'s; "
                            "rerun `brainddpm condition-plan`")
    return encoding, plan


def fast_model(model: torch.nn.Module, performance: Performance) -> torch.nn.Module:
    """The network as sampling calls it: compiled when `performance.compile` (once per shape: the last,
    smaller batch of a job compiles again), GroupNorm in bf16 when `performance.low_precision_norm`. A
    graph that fails to compile runs eagerly, with a warning (dynamo's `suppress_errors`)."""
    if performance.low_precision_norm:
        use_low_precision_norms(model)
    if not performance.compile:
        return model
    log.info("compiling the network (torch.compile, mode %s; performance.compile: false runs eagerly)",
             performance.compile_mode)
    kwargs = {} if performance.compile_mode == "default" else {"mode": performance.compile_mode}
    return _EagerFallback(torch.compile(model, backend=performance.compile_backend, dynamic=False, **kwargs))


class _EagerFallback(torch.nn.Module):
    """A compiled network whose graphs that fail to compile run eagerly: dynamo's `suppress_errors`, set
    around each call only (not for the whole process)."""

    def __init__(self, compiled: torch.nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args, **kwargs):
        import torch._dynamo.config as dynamo_config

        with dynamo_config.patch(suppress_errors=True):
            return self.compiled(*args, **kwargs)


def latent_decoder(config: dict, checkpoint: Path, autoencoder: Path | None, device: torch.device):
    """For a latent diffusion model: the autoencoder that made its training latents, checked (None for a pixel
    model). Another autoencoder file, or one with another scale factor, is refused, naming both files."""
    if "latent_shape" not in config["data"]:
        if autoencoder is not None:
            raise BadInputError(autoencoder, f"given to decode, but {checkpoint} is a pixel model (it samples volumes, "
                                "not latents): leave --autoencoder out")
        return None
    if autoencoder is None:
        raise BadInputError(checkpoint, "a latent diffusion model: sampling needs its autoencoder (--autoencoder)")
    decoder, ae_config = load_autoencoder(autoencoder, device)
    data = config["data"]
    if ae_config["sha256"] != data["autoencoder_sha256"]:
        raise CheckpointError(f"{autoencoder} (sha256 {ae_config['sha256'][:12]}) is not the autoencoder whose latents "
                              f"trained {checkpoint} (sha256 {data['autoencoder_sha256'][:12]}): another run or shape")
    if ae_config["scale_factor"] != data["scale_factor"]:
        raise CheckpointError(f"latent scale factor {ae_config['scale_factor']} of {autoencoder} differs from the "
                              f"{data['scale_factor']} that {checkpoint} was trained with")
    return decoder


def background_rule(sample_cfg: dict, mask_rule: Path | None) -> dict | None:
    """The mask rule that sets the synthetic background to 0 (`sample.background: mask`; background.py), or None
    (`keep`: the volumes as the network made them; also a sample section without the key, as older runs')."""
    from brainddpm.sampling.background import read_mask_rule

    if sample_cfg.get("background", "keep") == "keep":
        return None
    if mask_rule is None:
        raise ConfigError("config key 'sample.background': mask needs the mask rule of the training split "
                          "(--mask-rule, written by `brainddpm mask-rule`); or set sample.background: keep")
    return read_mask_rule(mask_rule)


def write_nifti_files(vols: list, masks: list | None, meta: list[dict], affine, nifti_dir: Path, sampler: str) -> None:
    """One NIfTI per volume, <subject>_<sampler>.nii.gz, and its brain mask beside it (_mask.nii.gz)."""
    nifti_dir = Path(nifti_dir)
    nifti_dir.mkdir(parents=True, exist_ok=True)
    for k, (vol, m) in enumerate(zip(vols, meta)):
        save_volume(vol, affine, nifti_dir / f"{m['subject']}_{sampler}.nii.gz")
        if masks is not None:
            save_volume(masks[k], affine, nifti_dir / f"{m['subject']}_{sampler}_mask.nii.gz", dtype=np.uint8)


def run_sample(sample_cfg: dict, checkpoint: Path, sampler: str, part: int, out: Path, nifti_dir: Path,
               sheet: Path | None = None, plan_path: Path | None = None, performance: dict | None = None,
               autoencoder: Path | None = None, decode_cfg: dict | None = None, mask_rule: Path | None = None) -> dict:
    """Sample the volumes of job `part`; write them as an HDF5 part, one NIfTI each, and a contact sheet.

    With `sample.background: mask`, each volume's background is set to 0 outside its brain mask (`mask_rule`,
    chosen on the training split: background.py); the mask is written as NIfTI beside the volume, and the
    unmasked volumes stay in the part as `raw_images` (for the realism probe).

    A conditional model samples volume i with the covariates the plan gives it (classifier-free guided with
    the plan's guidance scale); they are stored with the volume (HDF5 and a JSON sidecar next to its NIfTI).
    A latent model samples latents, which `autoencoder` decodes (models/autoencoder.decode_latents: the scale
    undone, whole or by `decode_cfg.roi` windows) to volumes on the image grid.
    `performance`: the config's `performance` section (device.resolve_performance: on a GPU, `auto`
    compiles the network; never on a CPU unless asked).
    """
    device = pick_device(sample_cfg["device"])
    rule = background_rule(sample_cfg, mask_rule)
    model, config = load_final(checkpoint, device)
    model = fast_model(model, resolve_performance(performance, device))
    decoder = latent_decoder(config, checkpoint, autoencoder, device)
    encoding, plan = conditions_for(config, plan_path, checkpoint)
    if plan and len(plan["volumes"]) != sample_cfg["n"]:
        raise BadInputError(plan_path, f"plans {len(plan['volumes'])} volumes, sample.n is {sample_cfg['n']}")
    shape = tuple(config["data"]["target_shape"])
    noise_shape = tuple(config["data"].get("latent_shape", (1, *shape)))
    affine = np.asarray(config["data"]["affine"], dtype=np.float64)
    scheduler = make_scheduler(config, sampler, sample_cfg.get("ddim_steps"), sample_cfg.get("rflow_steps"))
    batches = part_batches(sample_cfg["n"], sample_cfg["batch"], sample_cfg["jobs"], part)
    log.info("%s: %d volumes in %d batches on %s, %d steps", sampler, sum(map(len, batches)), len(batches),
             device, len(scheduler.timesteps))
    vols, meta, ckpt_sha = [], [], sha256_file(checkpoint)
    for batch in batches:
        seeds = [sample_cfg["base_seed"] + i for i in batch]
        requested = [plan["volumes"][i] for i in batch] if encoding else []
        context = torch.from_numpy(encoding.vectors([r["covariates"] for r in requested])) if encoding else None
        x = denoise(model, scheduler, seeds, noise_shape[1:], device, progress=sys.stderr.isatty(), context=context,
                    guidance_scale=plan.get("guidance_scale", 1.0), channels=noise_shape[0], clip=decoder is None)
        if decoder is not None:  # one volume at a time: a 1 mm decode holds several GB of activations per volume
            x = torch.cat([decode_latents(decoder, z[None].to(device), config["data"]["scale_factor"], shape,
                                          decode_cfg).cpu() for z in x])
        for k, (i, vol) in enumerate(zip(batch, x.numpy())):
            vols.append(vol[0])
            meta.append({"subject": f"synthetic-{i:04d}", "session": f"seed-{sample_cfg['base_seed'] + i}",
                         "dataset": f"synthetic:{sampler}", "source_path": str(checkpoint),
                         "source_sha256": ckpt_sha})
            if encoding:
                meta[-1].update(covariates=requested[k]["covariates"], stratum=requested[k]["stratum"])
    raw, masks = vols, None
    if rule is not None:
        from brainddpm.sampling.background import mask_background

        vols, masks = map(list, zip(*(mask_background(v, rule) for v in raw)))
    nifti_dir = Path(nifti_dir)
    write_nifti_files(vols, masks, meta, affine, nifti_dir, sampler)
    for m in meta:
        if encoding:  # what this volume was asked for, next to it
            sidecar = {"covariates": m["covariates"], "stratum": m["stratum"], "guidance_scale": plan["guidance_scale"],
                       "seed": int(m["session"].removeprefix("seed-")), "sampler": sampler,
                       "steps": len(scheduler.timesteps), "checkpoint": str(checkpoint), "checkpoint_sha256": ckpt_sha}
            with atomic_path(nifti_dir / f"{m['subject']}_{sampler}.json") as tmp:
                tmp.write_text(json.dumps(sidecar, indent=1))
    summary = write_shard(out, np.stack(vols), meta, affine, dtype="float32", compression="lzf",
                          raw_images=np.stack(raw) if rule else None,
                          attrs={"kind": "samples", "sampler": sampler, "checkpoint_step": config.get("step"),
                                 "steps": len(scheduler.timesteps), "part": part,
                                 "background": "mask" if rule else "keep", **({"mask_rule": rule} if rule else {}),
                                 **({"encoding": encoding.to_dict(), "guidance_scale": plan["guidance_scale"]}
                                    if encoding else {})})
    if sheet is not None:
        names = [m["subject"] + (f" ({m['stratum']})" if encoding else "") for m in meta]
        contact_sheet(np.stack(vols), names, sheet)
    return summary


def contact_sheet(vols: np.ndarray, names: list[str], png: Path) -> None:
    """Mid axial, coronal and sagittal slices of each volume, one row per volume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(vols), 3, figsize=(6, 2 * len(vols)), squeeze=False)
    for row, vol, name in zip(axes, vols, names):
        cx, cy, cz = (s // 2 for s in vol.shape)
        for ax, sl in zip(row, (vol[:, :, cz], vol[:, cy, :], vol[cx, :, :])):
            ax.imshow(np.rot90(sl), cmap="gray", vmin=0, vmax=1)
            ax.set_axis_off()
        row[0].set_title(name, fontsize=7, loc="left")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def resample_to_grid(path: Path, grid: dict, out_dir: Path) -> Path:
    """A copy of a synthetic NIfTI on `grid` (data.grid: the MNI 1 mm grid), trilinear; returns its path.

    Synthetic volumes are written at the model's shape over the MNI grid's field of view; some tools want
    the 1 mm grid itself. nibabel's resample_from_to does the interpolation (scipy, order 1)."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    img = nib.load(str(path))
    target = (tuple(grid["shape"]), grid_affine(grid["shape"], grid["spacing"], grid["origin"]))
    moved = resample_from_to(img, target, order=1, mode="nearest")  # the outer half voxel: its edge value
    name = Path(path).name.split(".nii")[0] + "_mni1mm.nii.gz"
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_volume(np.clip(np.asarray(moved.dataobj, dtype=np.float32), 0.0, 1.0), target[1], Path(out_dir) / name)
    return Path(out_dir) / name
