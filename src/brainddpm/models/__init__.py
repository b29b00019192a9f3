"""Stage 2, models: the networks and what they need to be rebuilt, apart from how they are trained.

`diffusion` builds MONAI's DiffusionModelUNet and DDPM/DDIM schedulers from the config and holds the
noise-prediction loss; `autoencoder` builds MONAI's AutoencoderKL (and its PatchDiscriminator) for latent
diffusion and holds the codec around it (padding, the latent scale factor, whole or sliding-window
decoding, its file); `conditioning` is the covariate encoding that a conditional model takes as its
cross-attention context; `final` writes and reads ``model.safetensors``, the file that training hands to
sampling and evaluation. Both training and sampling import this package; it imports neither.
"""
