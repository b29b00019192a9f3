"""Stage 3, training: one engine and one loop for every model the workflow trains.

`loop` is the training loop (read it top to bottom); `tasks` is what differs between the models it trains
(the diffusion UNet, pixel or latent, and the autoencoder: network, objective, final file), `objectives`
their losses (and the adversarial loss's discriminator, which the engine carries); `engine` puts the backend (DeepSpeed, Accelerate or
DDP), precision, compilation and EMA behind one interface; `resume` restores and refuses checkpoints and
writes the run's outputs; `checkpoint` holds the atomic checkpoint folders; `runtime` is one process's
place in the process group and the preemption signal; `launch` submits the run through submitit (SLURM,
local processes or in-process) and waits for it; `perf` counts FLOPs and MFU; `progress` is the loss log.
"""
