# Report stage: metrics table (markdown, CSV, JSON), loss curve, slices, CI plot, memorization.


rule report:
    input:
        metrics=[f"{EVAL}/{s}/metrics.json" for s in SAMPLERS],
        memorization=f"{EVAL}/memorization.json",
        samples=sample_targets(),
        train=f"{R}/shards/train/index.json",
        real=f"{R}/shards/val/index.json",
        info=f"{TRAIN_DIR}/train.json",
        loss=f"{TRAIN_DIR}/loss.png",
        conditioning=conditioning_targets(),
        reconstruction=reconstruction_targets(),
        utility=utility_targets(),  # utility.enabled only
    output:
        md=f"{R}/report/report.md",
        html=report(f"{R}/report/report.html", caption="../report/summary.rst", category="Summary"),
        table=report(f"{R}/report/metrics.md", caption="../report/metrics.rst", category="Metrics"),
        csv=f"{R}/report/metrics.csv",
        json=f"{R}/report/metrics.json",
        ci=report(f"{R}/report/ci.png", caption="../report/ci.rst", category="Metrics"),
        slices=report(f"{R}/report/slices.png", caption="../report/slices.rst", category="Samples"),
        memorization=report(f"{R}/report/memorization.png", caption="../report/memorization.rst",
                            category="Memorization"),
    params:
        samplers=SAMPLERS,
        train=lambda wc, input: os.path.dirname(input.train),
        real=lambda wc, input: os.path.dirname(input.real),
        run_dir=lambda wc, input: os.path.dirname(input.info),
        out=lambda wc, output: os.path.dirname(output.md),
    benchmark:
        f"{R}/benchmarks/report.tsv"
    log:
        f"{R}/logs/report.log",
    conda:
        "../envs/brainddpm.yaml"
    shell:
        "brainddpm report --samplers {params.samplers} --metrics {input.metrics} "
        "--memorization {input.memorization} --samples {input.samples} --train {params.train} "
        "--real {params.real} --run-dir {params.run_dir} --out {params.out}"
        + (" --conditioning {input.conditioning}" if CONDITIONED else "")
        + (" --reconstruction {input.reconstruction}" if LATENT else "")
        + (" --utility {input.utility}" if UTILITY else "")
        + (" --compare {}".format(config["compare_with"]) if config.get("compare_with") else "")
        + " 2> {log}"
