# Evaluation stage: features once per sampler -> evaluate.jobs bootstrap chunks -> metrics.json;
# memorization check against the training set.


localrules:
    fetch_fid_weights,  # needs the internet: runs where Snakemake runs (a login node), never in a job


rule fetch_fid_weights:
    output:
        config["evaluate"]["fid"]["weights"] or "resources/medicalnet/weights.pth",
    params:
        url=config["evaluate"]["fid"]["url"],
    log:
        f"{R}/logs/fetch_fid_weights.log",
    conda:
        "../envs/brainddpm.yaml"
    shell:
        "brainddpm fetch-fid-weights --url {params.url:q} --out {output} 2> {log}"


rule features:
    input:
        real=f"{R}/shards/val/index.json",
        samples=lambda wc: sample_parts(wc.sampler),
        weights=FID_WEIGHTS,
    output:
        inputs=f"{EVAL}/{{sampler}}/inputs.npz",
        ids=f"{EVAL}/{{sampler}}/ids.json",
    params:
        cfg=stage_config("seed", "evaluate"),
        real=lambda wc, input: os.path.dirname(input.real),
    resources:
        gpu_jobs=1,  # not `gpu`: the SLURM plugin would turn that into --gpus (profiles set gres)
    benchmark:
        f"{R}/benchmarks/evaluate/{RUN}-{{sampler}}-features.tsv"
    log:
        f"{R}/logs/evaluate/{RUN}-{{sampler}}-features.log",
    conda:
        "../envs/brainddpm.yaml"
    shell:
        "brainddpm features --config-json {params.cfg:q} --real {params.real} --samples {input.samples} "
        "--out {output.inputs} --ids {output.ids} 2> {log}"


rule bootstrap:
    input:
        inputs=f"{EVAL}/{{sampler}}/inputs.npz",
    output:
        f"{EVAL}/{{sampler}}/boot/chunk-{{k}}.npz",
    params:
        cfg=stage_config("seed", "evaluate"),
        part=lambda wc: int(wc.k),
    benchmark:
        f"{R}/benchmarks/evaluate/{RUN}-{{sampler}}-boot-{{k}}.tsv"
    log:
        f"{R}/logs/evaluate/{RUN}-{{sampler}}-boot-{{k}}.log",
    conda:
        "../envs/brainddpm.yaml"
    shell:
        "brainddpm bootstrap --config-json {params.cfg:q} --inputs {input.inputs} --part {params.part} "
        "--out {output} 2> {log}"


rule gather_metrics:
    input:
        inputs=f"{EVAL}/{{sampler}}/inputs.npz",
        ids=f"{EVAL}/{{sampler}}/ids.json",
        chunks=lambda wc: bootstrap_chunks(wc.sampler),
    output:
        f"{EVAL}/{{sampler}}/metrics.json",
    benchmark:
        f"{R}/benchmarks/evaluate/{RUN}-{{sampler}}-gather.tsv"
    log:
        f"{R}/logs/evaluate/{RUN}-{{sampler}}-gather.log",
    conda:
        "../envs/brainddpm.yaml"
    shell:
        "brainddpm gather --inputs {input.inputs} --ids {input.ids} --chunks {input.chunks} --out {output} 2> {log}"


rule memorization:
    input:
        train=f"{R}/shards/train/index.json",
        real=f"{R}/shards/val/index.json",
        samples=sample_parts(SAMPLERS[0]),
    output:
        f"{EVAL}/memorization.json",
    params:
        cfg=stage_config("seed", "evaluate"),
        train=lambda wc, input: os.path.dirname(input.train),
        real=lambda wc, input: os.path.dirname(input.real),
    benchmark:
        f"{R}/benchmarks/evaluate/{RUN}-memorization.tsv"
    log:
        f"{R}/logs/evaluate/{RUN}-memorization.log",
    conda:
        "../envs/brainddpm.yaml"
    shell:
        "brainddpm memorization --config-json {params.cfg:q} --train {params.train} --real {params.real} "
        "--samples {input.samples} --out {output} 2> {log}"


rule condition_check:
    input:
        train=f"{R}/shards/train/index.json",
        real=f"{R}/shards/val/index.json",
        samples=lambda wc: sample_parts(wc.sampler),
    output:
        f"{EVAL}/{{sampler}}/conditioning.json",
    params:
        cfg=stage_config("seed", "evaluate"),
        train=lambda wc, input: os.path.dirname(input.train),
        real=lambda wc, input: os.path.dirname(input.real),
    benchmark:
        f"{R}/benchmarks/evaluate/{RUN}-{{sampler}}-condition-check.tsv"
    log:
        f"{R}/logs/evaluate/{RUN}-{{sampler}}-condition-check.log",
    conda:
        "../envs/brainddpm.yaml"
    shell:
        "brainddpm condition-check --config-json {params.cfg:q} --train {params.train} --real {params.real} "
        "--samples {input.samples} --out {output} 2> {log}"


rule evaluate:
    input:
        evaluate_targets(),
