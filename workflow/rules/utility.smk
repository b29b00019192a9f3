# Utility stage (utility.enabled): does a model trained with synthetic scans do better on real ones?
# utility_part: one job per arm and repeat (downstream models trained on the real training split, alone or
# with synthetic / augmented / oversampled volumes; predictions on the validation split, the test set);
# two_sample: one per sampler (a CNN tells real from synthetic volumes; 0.5 = indistinguishable);
# utility_gather: every part -> utility.json (per arm and model: metric, CI, n, paired difference vs real).
# Without utility.enabled none of these rules exists.


if UTILITY:
    from brainddpm.utility.arms import needs_synthetic

    rule utility_part:
        input:
            train=f"{R}/shards/train/index.json",
            real=f"{R}/shards/val/index.json",
            # only the arms synthetic and mix-<ratio> read the synthetic volumes (of utility.sampler)
            samples=lambda wc: sample_parts(utility_sampler()) if needs_synthetic(wc.arm) else [],
        output:
            f"{UTILITY_DIR}/parts/{{arm}}/repeat-{{repeat}}.json",
        log:
            f"{R}/logs/utility/{RUN}-{{arm}}-{{repeat}}.log",
        benchmark:
            f"{R}/benchmarks/utility/{RUN}-{{arm}}-{{repeat}}.tsv"
        wildcard_constraints:
            arm=r"real|synthetic|augmented|oversampled|mix-[0-9.]+",
            repeat=r"\d+",
        conda:
            "../envs/brainddpm.yaml"
        resources:
            gpu_jobs=1,  # the downstream CNN takes a free GPU where there is one (CPU in the demo)
        params:
            cfg=lambda wc: utility_config("part", wc.arm),
            train=lambda wc, input: os.path.dirname(input.train),
            real=lambda wc, input: os.path.dirname(input.real),
        shell:
            shell_line(
                "brainddpm utility-part --settings-json {params.cfg:q} --train {params.train} --val {params.real} "
                "--samples {input.samples} --arm {wildcards.arm} --repeat {wildcards.repeat} --out {output} 2> {log}"
            )

    rule two_sample:
        input:
            real=f"{R}/shards/val/index.json",
            samples=lambda wc: sample_parts(wc.sampler),
        output:
            f"{UTILITY_DIR}/two-sample/{{sampler}}.json",
        log:
            f"{R}/logs/utility/{RUN}-{{sampler}}-two-sample.log",
        benchmark:
            f"{R}/benchmarks/utility/{RUN}-{{sampler}}-two-sample.tsv"
        conda:
            "../envs/brainddpm.yaml"
        resources:
            gpu_jobs=1,
        params:
            cfg=utility_config("two_sample"),
            real=lambda wc, input: os.path.dirname(input.real),
        shell:
            shell_line(
                "brainddpm two-sample --settings-json {params.cfg:q} --real {params.real} --samples {input.samples} "
                "--out {output} 2> {log}"
            )

    rule utility_gather:
        input:
            parts=utility_parts(),
            two_sample=two_sample_targets(),
        output:
            UTILITY_JSON,
        log:
            f"{R}/logs/utility/{RUN}-gather.log",
        benchmark:
            f"{R}/benchmarks/utility/{RUN}-gather.tsv"
        conda:
            "../envs/brainddpm.yaml"
        params:
            cfg=utility_config("gather"),
            run=RUN,
        shell:
            shell_line(
                "brainddpm utility-gather --settings-json {params.cfg:q} --parts {input.parts} "
                "--two-sample {input.two_sample} --run {params.run} --out {output} 2> {log}"
            )

    rule utility:
        input:
            utility_targets(),
