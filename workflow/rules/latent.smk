# Latent diffusion (model.kind: latent): image shards -> autoencoder -> latent shards (one job per shard)
# -> `train` on them (train.smk); sampling decodes (sample.smk); `reconstruction` measures the autoencoder.
# Nothing here exists for a pixel model (the default).

if LATENT:

    if config["launch"]["executor"] == "slurm":

        localrules:
            train_autoencoder,  # submits and watches its own submitit SLURM job, like `train`

    if PERCEPTUAL_READY:

        localrules:
            fetch_perceptual_weights,  # needs the internet: runs where Snakemake runs, never in a job

        rule fetch_perceptual_weights:
            output:
                PERCEPTUAL_READY,
            log:
                f"{R}/logs/fetch_perceptual_weights.log",
            conda:
                "../envs/brainddpm.yaml"
            params:
                network=config["autoencoder"]["perceptual"]["network"],
                cache=config["autoencoder"]["perceptual"]["cache_dir"],
            shell:
                shell_line(
                    "brainddpm fetch-perceptual-weights --network {params.network} --cache-dir {params.cache:q} "
                    "--marker {output} 2> {log}"
                )

    rule train_autoencoder:
        input:
            index=f"{R}/shards/train/index.json",
            perceptual=PERCEPTUAL_READY,
        output:
            model=protected(AUTOENCODER),  # GPU hours, and every latent depends on it: never overwritten
            info=f"{AUTOENCODER_DIR}/train.json",
            loss=f"{AUTOENCODER_DIR}/loss.csv",
            plot=report(f"{AUTOENCODER_DIR}/loss.png", caption="../report/loss.rst", category="Training"),
        log:
            f"{R}/logs/train/{RUN}-autoencoder.log",
        benchmark:
            f"{R}/benchmarks/train/{RUN}-autoencoder.tsv"
        conda:
            "../envs/brainddpm.yaml"
        threads: training_threads  # common.smk
        resources:
            launch=dumps(config["launch"]),  # where the job runs: not a rerun trigger (see train.smk)
            # memory, not results: no rerun trigger (not in params: common.smk autoencoder_config)
            use_checkpoint=str(config["autoencoder"]["use_checkpoint"]).lower(),
        params:
            cfg=autoencoder_config(),
            shards=lambda wc, input: os.path.dirname(input.index),
            out=lambda wc, output: os.path.dirname(output.model),
        shell:
            shell_line(
                "brainddpm train-autoencoder --config-json {params.cfg:q} --launch-json {resources.launch:q} "
                "--use-checkpoint {resources.use_checkpoint} --shards {params.shards} --out {params.out} 2> {log}"
            )

    rule encode:
        input:
            autoencoder=AUTOENCODER,
            shard=f"{R}/shards/{{split}}/shard-{{i}}.h5",
        output:
            f"{LATENTS}/{{split}}/shard-{{i}}.h5",
        log:
            f"{R}/logs/encode/{RUN}-{{split}}-{{i}}.log",
        benchmark:
            f"{R}/benchmarks/encode/{RUN}-{{split}}-{{i}}.tsv"
        conda:
            "../envs/brainddpm.yaml"
        resources:
            gpu_jobs=1,  # not `gpu`: the SLURM plugin would turn that into --gpus (profiles set gres)
        shell:
            shell_line(
                "brainddpm encode --autoencoder {input.autoencoder} --shard {input.shard} --out {output} 2> {log}"
            )

    rule latent_index:
        input:
            latent_files,
        output:
            f"{LATENTS}/{{split}}/index.json",
        log:
            f"{R}/logs/encode/{RUN}-{{split}}-index.log",
        benchmark:
            f"{R}/benchmarks/encode/{RUN}-{{split}}-index.tsv"
        conda:
            "../envs/brainddpm.yaml"
        shell:
            shell_line("brainddpm index --split {wildcards.split} --shards {input} --out {output} 2> {log}")

    rule reconstruction:
        input:
            autoencoder=AUTOENCODER,
            real=f"{R}/shards/val/index.json",
        output:
            json=f"{EVAL}/reconstruction.json",
            png=f"{EVAL}/reconstruction.png",
        log:
            f"{R}/logs/evaluate/{RUN}-reconstruction.log",
        benchmark:
            f"{R}/benchmarks/evaluate/{RUN}-reconstruction.tsv"
        conda:
            "../envs/brainddpm.yaml"
        resources:
            gpu_jobs=1,
        params:
            cfg=evaluation_config("reconstruction"),
            real=lambda wc, input: os.path.dirname(input.real),
        shell:
            shell_line(
                "brainddpm reconstruction --config-json {params.cfg:q} --autoencoder {input.autoencoder} "
                "--real {params.real} --out {output.json} --png {output.png} 2> {log}"
            )

    rule encode_all:  # `snakemake encode_all`: the latent shards of both splits
        input:
            expand(f"{LATENTS}/{{split}}/index.json", split=["train", "val"]),
