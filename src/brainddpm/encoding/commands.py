"""The encoding stage's subcommand: encode (the rule `encode` of latent.smk)."""

from __future__ import annotations

from pathlib import Path


def cmd_encode(args) -> None:
    from brainddpm.encoding.encode import run_encode

    run_encode(args.autoencoder, args.shard, args.out, args.device)


def add_commands(sub) -> None:
    p = sub.add_parser("encode", help="encode one image shard into a latent shard (latent diffusion)",
                       description="Encode every volume of an image shard with the trained autoencoder (posterior "
                                   "mean, times the autoencoder's latent scale factor) into a latent shard with the "
                                   "same metadata. List a split's latent shards with `brainddpm index`.")
    p.add_argument("--autoencoder", type=Path, required=True, help="autoencoder.safetensors (train-autoencoder)")
    p.add_argument("--shard", type=Path, required=True, help="image shard, e.g. results/shards/train/shard-0000.h5")
    p.add_argument("--out", type=Path, required=True, help="latent shard to write")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="default: a free GPU, else CPU")
    p.set_defaults(func=cmd_encode)
