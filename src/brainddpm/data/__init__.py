"""Stage 1, data: NIfTI -> manifest -> subject-level split -> validated HDF5 shards.

`nifti` reads and checks images and resamples them to the configured grid; `manifest` finds the images
of each dataset and their covariates (`covariates`), `prepare` runs the stage's steps (manifest, split,
shard, index: one function per rule), `shards` writes and verifies the HDF5 files, and `dataset` is the
torch Dataset that the training stage reads them through. `demo` writes the embedded synthetic cohort
that the demo runs on. Nothing here imports a later stage: the shards are this stage's whole hand-off.
"""
