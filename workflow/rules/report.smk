# Report stage: metrics table (markdown, CSV, JSON), loss curve, slices, CI plot, memorization.


rule report:
    input:
        metrics=[f"{EVAL}/{s}/metrics.json" for s in SAMPLERS],
        memorization=f"{EVAL}/memorization.json",
        realism=realism_targets(),
        samples=sample_targets(),
        train=f"{R}/shards/train/index.json",
        real=f"{R}/shards/val/index.json",
        info=f"{TRAIN_DIR}/train.json",
        loss=f"{TRAIN_DIR}/loss.png",
        conditioning=conditioning_targets(),
        reconstruction=reconstruction_targets(),
        utility=utility_targets(),  # utility.enabled only
        data=rules.qc.output.summary,  # the "Data" section: input QC and what was left out
    output:
        md=f"{R}/report/report.md",
        html=report(f"{R}/report/report.html", caption="../report/summary.rst", category="Summary"),
        table=report(f"{R}/report/metrics.md", caption="../report/metrics.rst", category="Metrics"),
        csv=f"{R}/report/metrics.csv",
        json=f"{R}/report/metrics.json",
        ci=report(f"{R}/report/ci.png", caption="../report/ci.rst", category="Metrics"),
        slices=report(f"{R}/report/slices.png", caption="../report/slices.rst", category="Samples"),
        memorization=report(
            f"{R}/report/memorization.png", caption="../report/memorization.rst", category="Memorization"
        ),
    log:
        f"{R}/logs/report.log",
    benchmark:
        f"{R}/benchmarks/report.tsv"
    conda:
        "../envs/brainddpm.yaml"
    params:
        samplers=SAMPLERS,
        train=lambda wc, input: os.path.dirname(input.train),
        real=lambda wc, input: os.path.dirname(input.real),
        run_dir=lambda wc, input: os.path.dirname(input.info),
        out=lambda wc, output: os.path.dirname(output.md),
        qc_dir=lambda wc, input: os.path.dirname(input.data),
    shell:
        shell_line(
            "brainddpm report --samplers {params.samplers} --metrics {input.metrics} "
            "--memorization {input.memorization} --samples {input.samples} --train {params.train} "
            "--real {params.real} --run-dir {params.run_dir} --out {params.out} --realism {input.realism}"
            + (" --conditioning {input.conditioning}" if CONDITIONED else "")
            + (" --reconstruction {input.reconstruction}" if LATENT else "")
            + (" --utility {input.utility}" if UTILITY else "")
            + (f" --compare {shlex.quote(config['compare_with'])}" if config["compare_with"] else "")
            + " --qc-dir {params.qc_dir} 2> {log}"
        )
