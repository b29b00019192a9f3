# Training stage: shards -> model.safetensors (EMA weights + config), loss.csv/png, train.json.
# `brainddpm train` submits through submitit (SLURM job, local processes or in-process) and waits.
# With launch.executor: slurm the rule only submits and watches its own (multi-node, requeueing) job,
# so it runs where Snakemake runs (the login node) instead of holding a 24 h allocation itself.

if config["launch"]["executor"] == "slurm":

    localrules:
        train,


rule train:
    input:
        index=TRAIN_INDEX,  # the image shards, or for latent diffusion the latent shards (latent.smk)
        base=FINETUNE_BASE,  # a fine-tuning run's base model (finetune.init_from), else nothing
    output:
        model=protected(MODEL),  # hours of GPU time: never deleted or overwritten by a rerun
        info=f"{TRAIN_DIR}/train.json",
        loss=f"{TRAIN_DIR}/loss.csv",
        plot=report(f"{TRAIN_DIR}/loss.png", caption="../report/loss.rst", category="Training"),
    log:
        f"{R}/logs/train/{RUN}.log",
    benchmark:
        f"{R}/benchmarks/train/{RUN}.tsv"
    conda:
        "../envs/brainddpm.yaml"
    threads: training_threads  # common.smk
    resources:
        # Where and how the job runs (nodes, qos, time, requeues, setup lines): like any resource it is
        # not a rerun trigger, so a finished model is not retrained after such a change (params are).
        launch=dumps(config["launch"]),
    params:
        cfg=stage_config("train"),
        shards=lambda wc, input: os.path.dirname(input.index),
        out=lambda wc, output: os.path.dirname(output.model),
    shell:
        shell_line(
            "brainddpm train --config-json {params.cfg:q} --launch-json {resources.launch:q} "
            "--shards {params.shards} --out {params.out} 2> {log}"
        )
