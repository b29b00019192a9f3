# Data stage: NIfTI -> manifest -> subject split -> HDF5 shards (one job per shard) -> index.json


rule demo_cohort:
    output:
        participants=f"{DEMO_DIR}/participants.tsv",
    log:
        f"{R}/logs/demo_cohort.log",
    benchmark:
        f"{R}/benchmarks/demo_cohort.tsv"
    conda:
        "../envs/brainddpm.yaml"
    params:
        n=config["demo"]["n"],
        seed=config["demo"]["seed"],
        out=lambda wc, output: os.path.dirname(output.participants),
    shell:
        shell_line(
            "brainddpm demo-cohort --n {params.n} --seed {params.seed} --out {params.out} "
            "--mosaic {params.out}/mosaic.png"
            # the conditional demo's age effect; absent from the default demo's command (and its params)
            + (
                " --ventricle-growth-mm {}".format(config["demo"]["ventricle_growth_mm"])
                if config["demo"]["ventricle_growth_mm"]
                else ""
            )
            # the utility demo's diagnosis column (a minority of patients); likewise absent unless set
            + (
                " --patient-fraction {}".format(config["demo"]["patient_fraction"])
                if config["demo"]["patient_fraction"]
                else ""
            )
            + " 2> {log}"
        )


rule preprocess:
    input:
        lambda wc: PREPROCESS_JOBS[preprocessed_paths(PREPROCESSED, wc.dataset, wc.subject, wc.session)["brain"]],
    output:
        **preprocessed_paths(PREPROCESSED, "{dataset}", "{subject}", "{session}"),
    log:
        f"{R}/logs/preprocess/{{dataset}}/{{subject}}_{{session}}.log",
    benchmark:
        f"{R}/benchmarks/preprocess/{{dataset}}/{{subject}}_{{session}}.tsv"
    conda:
        "../envs/brainddpm.yaml"
    threads: 2
    resources:
        gpu=0,
    params:
        cfg=preprocess_config(),
        cache=f"{PREPROCESSED}/cache",
    shell:
        shell_line(
            # ANTs (ITK) would take every core of the node; the job has {threads}
            "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS={threads} brainddpm preprocess --config-json {params.cfg:q} --input {input} --brain {output.brain} "
            "--mask {output.mask} --transform {output.transform} --qc-png {output.qc_png} --cache {params.cache} "
            "2> {log}"
        )


rule manifest:
    input:
        DEMO_PARTICIPANTS,
        list(PREPROCESS_JOBS),
    output:
        manifest=f"{R}/manifest.tsv",
        excluded=f"{R}/qc/excluded.tsv",
    log:
        f"{R}/logs/manifest.log",
    benchmark:
        f"{R}/benchmarks/manifest.tsv"
    conda:
        "../envs/brainddpm.yaml"
    threads: 4
    params:
        cfg=stage_config("manifest"),
    shell:
        shell_line(
            "brainddpm manifest --config-json {params.cfg:q} --manifest {output.manifest} "
            "--excluded {output.excluded} --jobs {threads}"
            # datasets to preprocess are read from the preprocess rule's folder; absent from other runs' command
            + (f" --preprocessed {PREPROCESSED}" if PREPROCESS_JOBS else "") + " 2> {log}"
        )


rule qc:
    input:
        manifest=rules.manifest.output.manifest,
        excluded=rules.manifest.output.excluded,
    output:
        qc=f"{QC}/qc.tsv",
        summary=f"{QC}/data_summary.json",
        mosaic=report(f"{QC}/worst.png", caption="../report/qc.rst", category="Data"),
    log:
        f"{R}/logs/qc.log",
    benchmark:
        f"{R}/benchmarks/qc.tsv"
    conda:
        "../envs/brainddpm.yaml"
    threads: 4
    params:
        cfg=stage_config("qc"),
    shell:
        shell_line(
            "brainddpm qc --config-json {params.cfg:q} --manifest {input.manifest} --excluded {input.excluded} "
            "--out {output.qc} --summary {output.summary} --mosaic {output.mosaic} --jobs {threads} 2> {log}"
        )


checkpoint split:
    input:
        manifest=rules.manifest.output.manifest,
        qc=rules.qc.output.qc if QC_EXCLUDES else [],  # data.qc.policy: exclude: without what QC left out
    output:
        splits=f"{R}/splits.tsv",
    log:
        f"{R}/logs/split.log",
    benchmark:
        f"{R}/benchmarks/split.tsv"
    conda:
        "../envs/brainddpm.yaml"
    params:
        cfg=stage_config("split"),
    shell:
        shell_line(
            "brainddpm split --config-json {params.cfg:q} --manifest {input.manifest} --out {output.splits}"
            + (" --qc {input.qc}" if QC_EXCLUDES else "")
            + " 2> {log}"
        )


rule shard:
    input:
        splits=f"{R}/splits.tsv",
    output:
        f"{R}/shards/{{split}}/shard-{{i}}.h5",
    log:
        f"{R}/logs/shard/{{split}}-{{i}}.log",
    benchmark:
        f"{R}/benchmarks/shard/{{split}}-{{i}}.tsv"
    conda:
        "../envs/brainddpm.yaml"
    params:
        cfg=stage_config("shard"),
        index=lambda wc: int(wc.i),
    shell:
        shell_line(
            "brainddpm shard --config-json {params.cfg:q} --splits {input.splits} --split {wildcards.split} "
            "--index {params.index} --out {output} 2> {log}"
        )


rule shard_index:
    input:
        shard_files,
    output:
        f"{R}/shards/{{split}}/index.json",
    log:
        f"{R}/logs/shard/{{split}}-index.log",
    benchmark:
        f"{R}/benchmarks/shard/{{split}}-index.tsv"
    conda:
        "../envs/brainddpm.yaml"
    shell:
        shell_line("brainddpm index --split {wildcards.split} --shards {input} --out {output} 2> {log}")


rule prepare:
    input:
        prepare_targets(),
