# Sampling stage: sample.jobs jobs per sampler; volume i always uses seed sample.base_seed + i.


if CONDITIONED:
    MATCH_TRAINING = config["sample"].get("conditions") == "match_training"

    rule condition_plan:
        input:
            model=MODEL,
            real=f"{R}/shards/val/index.json",
            # match_training (the utility stage's plan) only: the training split's covariates
            train=f"{R}/shards/train/index.json" if MATCH_TRAINING else [],
        output:
            PLAN,
        params:
            n=config["sample"]["n"],
            conditions=dumps(config["sample"].get("conditions", "match_validation")),
            guidance=config["sample"].get("guidance_scale", 1.0),
            real=lambda wc, input: os.path.dirname(input.real),
        benchmark:
            f"{R}/benchmarks/sample/{RUN}-condition-plan.tsv"
        log:
            f"{R}/logs/sample/{RUN}-condition-plan.log",
        conda:
            "../envs/brainddpm.yaml"
        shell:
            "brainddpm condition-plan --n {params.n} --conditions-json {params.conditions:q} "
            "--guidance-scale {params.guidance} --checkpoint {input.model} --real {params.real} --out {output}"
            + (f" --train {R}/shards/train" if MATCH_TRAINING else "")
            + " 2> {log}"


rule sample_part:
    input:
        model=MODEL,
        plan=PLAN,
        autoencoder=AUTOENCODER,  # latent models: decodes the sampled latents
    output:
        part=f"{SAMPLES}/{{sampler}}/part-{{part}}.h5",
        nifti=directory(f"{SAMPLES}/{{sampler}}/nifti-{{part}}"),
        sheet=f"{SAMPLES}/{{sampler}}/part-{{part}}.png",
    params:
        cfg=sampler_config,
        part=lambda wc: int(wc.part),
    resources:
        gpu_jobs=1,  # not `gpu`: the SLURM plugin would turn that into --gpus (profiles set gres)
    benchmark:
        f"{R}/benchmarks/sample/{RUN}-{{sampler}}-{{part}}.tsv"
    log:
        f"{R}/logs/sample/{RUN}-{{sampler}}-{{part}}.log",
    conda:
        "../envs/brainddpm.yaml"
    shell:
        "brainddpm sample --config-json {params.cfg:q} --checkpoint {input.model} --sampler {wildcards.sampler} "
        "--part {params.part} --out {output.part} --nifti-dir {output.nifti} --sheet {output.sheet}"
        + (" --plan {input.plan}" if CONDITIONED else "")
        + (" --autoencoder {input.autoencoder}" if LATENT else "")
        + " 2> {log}"


rule sample:
    input:
        sample_targets(),
