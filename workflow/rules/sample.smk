# Sampling stage: sample.jobs jobs per sampler; volume i always uses seed sample.base_seed + i.


if CONDITIONED:
    MATCH_TRAINING = config["sample"]["conditions"] == "match_training"

    rule condition_plan:
        input:
            model=MODEL,
            real=f"{R}/shards/val/index.json",
            # match_training (the utility stage's plan) only: the training split's covariates
            train=f"{R}/shards/train/index.json" if MATCH_TRAINING else [],
        output:
            PLAN,
        log:
            f"{R}/logs/sample/{RUN}-condition-plan.log",
        benchmark:
            f"{R}/benchmarks/sample/{RUN}-condition-plan.tsv"
        conda:
            "../envs/brainddpm.yaml"
        params:
            n=config["sample"]["n"],
            conditions=dumps(config["sample"]["conditions"]),
            guidance=config["sample"]["guidance_scale"],
            real=lambda wc, input: os.path.dirname(input.real),
        shell:
            shell_line(
                "brainddpm condition-plan --n {params.n} --conditions-json {params.conditions:q} "
                "--guidance-scale {params.guidance} --checkpoint {input.model} --real {params.real} --out {output}"
                + (f" --train {shlex.quote(f'{R}/shards/train')}" if MATCH_TRAINING else "")
                + " 2> {log}"
            )


if MASKED:

    rule mask_rule:
        input:
            train=f"{R}/shards/train/index.json",
        output:
            MASK_RULE,
        log:
            f"{R}/logs/sample/mask-rule.log",
        benchmark:
            f"{R}/benchmarks/sample/mask-rule.tsv"
        conda:
            "../envs/brainddpm.yaml"
        params:
            train=lambda wc, input: os.path.dirname(input.train),
        shell:
            shell_line("brainddpm mask-rule --train {params.train} --out {output} 2> {log}")


rule sample_part:
    input:
        model=MODEL,
        plan=PLAN,
        autoencoder=AUTOENCODER,  # latent models: decodes the sampled latents
        mask_rule=MASK_RULE,  # sample.background: mask
    output:
        part=f"{SAMPLES}/{{sampler}}/part-{{part}}.h5",
        nifti=directory(f"{SAMPLES}/{{sampler}}/nifti-{{part}}"),
        sheet=f"{SAMPLES}/{{sampler}}/part-{{part}}.png",
    log:
        f"{R}/logs/sample/{RUN}-{{sampler}}-{{part}}.log",
    benchmark:
        f"{R}/benchmarks/sample/{RUN}-{{sampler}}-{{part}}.tsv"
    conda:
        "../envs/brainddpm.yaml"
    resources:
        gpu_jobs=1,  # not `gpu`: the SLURM plugin would turn that into --gpus (profiles set gres)
    params:
        cfg=sampler_config,
        part=lambda wc: int(wc.part),
    shell:
        shell_line(
            "brainddpm sample --config-json {params.cfg:q} --checkpoint {input.model} --sampler {wildcards.sampler} "
            "--part {params.part} --out {output.part} --nifti-dir {output.nifti} --sheet {output.sheet}"
            + (" --plan {input.plan}" if CONDITIONED else "")
            + (" --autoencoder {input.autoencoder}" if LATENT else "")
            + (" --mask-rule {input.mask_rule}" if MASKED else "")
            + " 2> {log}"
        )


rule sample:
    input:
        sample_targets(),
