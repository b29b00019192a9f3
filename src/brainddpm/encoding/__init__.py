"""Stage 4, encoding (latent diffusion only): image shards -> latent shards, with the trained autoencoder.

`encode` turns one image shard into one latent shard (the posterior mean of every volume, times the
autoencoder's latent scale factor), with the image shard's metadata (subjects, covariates) carried over;
the data stage's `index` then lists a split's latent shards with their scale factor. The diffusion training
of stage 3 reads them like image shards. Only used with model.kind: latent.
"""
