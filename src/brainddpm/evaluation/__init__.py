"""Stage 6, evaluation: samples and real volumes -> metric parts -> metrics with bootstrap CIs -> report.

`metrics` holds the distribution metrics (MMD, FID, MS-SSIM), `medicalnet` the 3D feature network of FID,
`bootstrap` the resampling, `evaluate` the rules' steps (features, bootstrap chunks, gather, memorization),
`condition_check` asks whether a conditional model's condition shows, `reconstruction` how well a latent
model's autoencoder reconstructs unseen volumes, and `report` writes the report.
"""
