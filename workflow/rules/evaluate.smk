# Evaluation stage: features once per sampler -> evaluate.jobs bootstrap chunks -> metrics.json;
# memorization check of every sampler's volumes against the training set; the realism probe per sampler.


localrules:
    fetch_fid_weights,  # needs the internet: runs where Snakemake runs (a login node), never in a job


rule fetch_fid_weights:
    output:
        config["evaluate"]["fid"]["weights"] or "resources/medicalnet/weights.pth",
    log:
        f"{R}/logs/fetch_fid_weights.log",
    conda:
        "../envs/brainddpm.yaml"
    params:
        url=config["evaluate"]["fid"]["url"],
    shell:
        shell_line("brainddpm fetch-fid-weights --url {params.url:q} --out {output} 2> {log}")


rule features:
    input:
        real=f"{R}/shards/val/index.json",
        samples=lambda wc: sample_parts(wc.sampler),
        weights=FID_WEIGHTS,
    output:
        inputs=f"{EVAL}/{{sampler}}/inputs.npz",
        ids=f"{EVAL}/{{sampler}}/ids.json",
    log:
        f"{R}/logs/evaluate/{RUN}-{{sampler}}-features.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{RUN}-{{sampler}}-features.tsv"
    conda:
        "../envs/brainddpm.yaml"
    resources:
        gpu_jobs=1,  # not `gpu`: the SLURM plugin would turn that into --gpus (profiles set gres)
    params:
        cfg=evaluation_config("features"),
        real=lambda wc, input: os.path.dirname(input.real),
    shell:
        shell_line(
            "brainddpm features --config-json {params.cfg:q} --real {params.real} --samples {input.samples} "
            "--out {output.inputs} --ids {output.ids} 2> {log}"
        )


rule bootstrap:
    input:
        inputs=f"{EVAL}/{{sampler}}/inputs.npz",
    output:
        f"{EVAL}/{{sampler}}/boot/chunk-{{k}}.npz",
    log:
        f"{R}/logs/evaluate/{RUN}-{{sampler}}-boot-{{k}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{RUN}-{{sampler}}-boot-{{k}}.tsv"
    conda:
        "../envs/brainddpm.yaml"
    params:
        cfg=evaluation_config("bootstrap"),
        part=lambda wc: int(wc.k),
    shell:
        shell_line(
            "brainddpm bootstrap --config-json {params.cfg:q} --inputs {input.inputs} --part {params.part} "
            "--out {output} 2> {log}"
        )


rule gather_metrics:
    input:
        inputs=f"{EVAL}/{{sampler}}/inputs.npz",
        ids=f"{EVAL}/{{sampler}}/ids.json",
        chunks=lambda wc: bootstrap_chunks(wc.sampler),
    output:
        f"{EVAL}/{{sampler}}/metrics.json",
    log:
        f"{R}/logs/evaluate/{RUN}-{{sampler}}-gather.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{RUN}-{{sampler}}-gather.tsv"
    conda:
        "../envs/brainddpm.yaml"
    shell:
        shell_line(
            "brainddpm gather --inputs {input.inputs} --ids {input.ids} --chunks {input.chunks} --out {output} 2> {log}"
        )


rule memorization:
    input:
        train=f"{R}/shards/train/index.json",
        real=f"{R}/shards/val/index.json",
        samples=sample_targets(),  # every sampler's parts (one sampler: the same list as before)
    output:
        f"{EVAL}/memorization.json",
    log:
        f"{R}/logs/evaluate/{RUN}-memorization.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{RUN}-memorization.tsv"
    conda:
        "../envs/brainddpm.yaml"
    params:
        cfg=evaluation_config("memorization"),
        train=lambda wc, input: os.path.dirname(input.train),
        real=lambda wc, input: os.path.dirname(input.real),
    shell:
        shell_line(
            "brainddpm memorization --config-json {params.cfg:q} --train {params.train} --real {params.real} "
            "--samples {input.samples} --out {output} 2> {log}"
        )


rule realism_probe:
    input:
        real=f"{R}/shards/val/index.json",
        samples=lambda wc: sample_parts(wc.sampler),
    output:
        json=f"{EVAL}/{{sampler}}/realism.json",
        png=report(f"{EVAL}/{{sampler}}/evidence.png", caption="../report/realism.rst", category="Realism"),
        nifti=f"{EVAL}/{{sampler}}/evidence.nii.gz",
    log:
        f"{R}/logs/evaluate/{RUN}-{{sampler}}-realism-probe.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{RUN}-{{sampler}}-realism-probe.tsv"
    conda:
        "../envs/brainddpm.yaml"
    params:
        cfg=evaluation_config("realism_probe"),
        real=lambda wc, input: os.path.dirname(input.real),
    shell:
        shell_line(
            "brainddpm realism-probe --config-json {params.cfg:q} --real {params.real} --samples {input.samples} "
            "--out {output.json} --png {output.png} --nifti {output.nifti} 2> {log}"
        )


rule condition_check:
    input:
        train=f"{R}/shards/train/index.json",
        real=f"{R}/shards/val/index.json",
        samples=lambda wc: sample_parts(wc.sampler),
    output:
        f"{EVAL}/{{sampler}}/conditioning.json",
    log:
        f"{R}/logs/evaluate/{RUN}-{{sampler}}-condition-check.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{RUN}-{{sampler}}-condition-check.tsv"
    conda:
        "../envs/brainddpm.yaml"
    params:
        cfg=evaluation_config("condition_check"),
        train=lambda wc, input: os.path.dirname(input.train),
        real=lambda wc, input: os.path.dirname(input.real),
    shell:
        shell_line(
            "brainddpm condition-check --config-json {params.cfg:q} --train {params.train} --real {params.real} "
            "--samples {input.samples} --out {output} 2> {log}"
        )


rule evaluate:
    input:
        evaluate_targets(),
