"""Stage 4, sampling: synthetic volumes from the final model file alone.

`plan` writes a conditional model's sampling plan (which covariates each volume asks for); `sample`
runs one sampling job (DDPM or DDIM, with classifier-free guidance) and writes its part as HDF5, NIfTI and
JSON sidecars.
"""
