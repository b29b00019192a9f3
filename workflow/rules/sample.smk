# Sampling stage: sample.jobs jobs per sampler; volume i always uses seed sample.base_seed + i.


rule sample_part:
    input:
        model=MODEL,
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
        "--part {params.part} --out {output.part} --nifti-dir {output.nifti} --sheet {output.sheet} 2> {log}"


rule sample:
    input:
        sample_targets(),
