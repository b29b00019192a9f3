"""Stage 3, training: one engine and one loop for every model the workflow trains.

`loop` is the training function (read it top to bottom); `tasks` is what differs between the models it trains
(the diffusion UNet, pixel or latent, and the autoencoder: network, objective, final file), `objectives`
their losses (the adversarial loss owns and steps its discriminator); `engine` puts the backend (DeepSpeed,
Accelerate or DDP), precision, compilation and EMA behind one interface; `checkpoint` is the one
`Checkpointer`, which saves, restores and refuses the `TrainState` (exact resume) in atomic checkpoint folders;
`outputs` writes the run's outputs at the end (final weights, train.json, loss.csv/png, digests); `runtime` is
one process's place in the process group and the preemption signal; `launch` submits the run through submitit
(SLURM, local processes or in-process) and waits for it, showing the live status file; `precision` decides
bf16 and its autocast; `flops` counts FLOPs and MFU; `losslog` is the loss log.
"""
