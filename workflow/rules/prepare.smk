# Data stage: NIfTI -> manifest -> subject split -> HDF5 shards (one job per shard) -> index.json


rule demo_cohort:
    output:
        participants=f"{DEMO_DIR}/participants.tsv",
    params:
        n=config["demo"]["n"],
        seed=config["demo"]["seed"],
        out=lambda wc, output: os.path.dirname(output.participants),
    benchmark:
        f"{R}/benchmarks/demo_cohort.tsv"
    log:
        f"{R}/logs/demo_cohort.log",
    conda:
        "../envs/brainddpm.yaml"
    shell:
        "brainddpm demo-cohort --n {params.n} --seed {params.seed} --out {params.out} "
        "--mosaic {params.out}/mosaic.png"
        # the conditional demo's age effect; absent from the default demo's command (and its params)
        + (" --ventricle-growth-mm {}".format(config["demo"]["ventricle_growth_mm"])
           if config["demo"].get("ventricle_growth_mm") else "")
        # the utility demo's diagnosis column (a minority of patients); likewise absent unless set
        + (" --patient-fraction {}".format(config["demo"]["patient_fraction"])
           if config["demo"].get("patient_fraction") else "")
        + " 2> {log}"


rule manifest:
    input:
        DEMO_PARTICIPANTS,
    output:
        manifest=f"{R}/manifest.tsv",
        excluded=f"{R}/qc/excluded.tsv",
    params:
        cfg=stage_config("datasets", "data", condition=True),
    threads: 4
    benchmark:
        f"{R}/benchmarks/manifest.tsv"
    log:
        f"{R}/logs/manifest.log",
    conda:
        "../envs/brainddpm.yaml"
    shell:
        "brainddpm manifest --config-json {params.cfg:q} --manifest {output.manifest} "
        "--excluded {output.excluded} --jobs {threads} 2> {log}"


checkpoint split:
    input:
        manifest=rules.manifest.output.manifest,
    output:
        splits=f"{R}/splits.tsv",
    params:
        cfg=stage_config("data", "seed", condition=True),
    benchmark:
        f"{R}/benchmarks/split.tsv"
    log:
        f"{R}/logs/split.log",
    conda:
        "../envs/brainddpm.yaml"
    shell:
        "brainddpm split --config-json {params.cfg:q} --manifest {input.manifest} --out {output.splits} 2> {log}"


rule shard:
    input:
        splits=f"{R}/splits.tsv",
    output:
        f"{R}/shards/{{split}}/shard-{{i}}.h5",
    params:
        cfg=stage_config("data", condition=True),
        index=lambda wc: int(wc.i),
    benchmark:
        f"{R}/benchmarks/shard/{{split}}-{{i}}.tsv"
    log:
        f"{R}/logs/shard/{{split}}-{{i}}.log",
    conda:
        "../envs/brainddpm.yaml"
    shell:
        "brainddpm shard --config-json {params.cfg:q} --splits {input.splits} --split {wildcards.split} "
        "--index {params.index} --out {output} 2> {log}"


rule shard_index:
    input:
        shard_files,
    output:
        f"{R}/shards/{{split}}/index.json",
    benchmark:
        f"{R}/benchmarks/shard/{{split}}-index.tsv"
    log:
        f"{R}/logs/shard/{{split}}-index.log",
    conda:
        "../envs/brainddpm.yaml"
    shell:
        "brainddpm index --split {wildcards.split} --shards {input} --out {output} 2> {log}"


rule prepare:
    input:
        prepare_targets(),
