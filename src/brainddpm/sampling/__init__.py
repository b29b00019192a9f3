"""Stage 5, sampling: synthetic volumes from the final model file alone (a latent model: and its autoencoder).

`plan` writes a conditional model's sampling plan (which covariates each volume asks for); `sample`
runs one sampling job (DDPM or DDIM, with classifier-free guidance; latents decoded by the autoencoder) and
writes its part as HDF5, NIfTI and JSON sidecars.
"""
