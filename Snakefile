# brain-ddpm: NIfTI -> manifest/split -> shards -> (autoencoder -> latent shards) -> checkpoint -> samples
# -> metric parts -> report.
# Declarations and includes only; the rules are in workflow/rules/<stage>.smk (their conda: and report
# caption paths are relative to workflow/rules/), the work happens in `brainddpm <subcommand>` (src/brainddpm).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


rule all:
    default_target: True
    input:
        all_targets(),


include: "workflow/rules/prepare.smk"
include: "workflow/rules/latent.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/utility.smk"


# what the data stage took in and left out, per dataset and reason: on the console, not only in a log
onsuccess:
    print_data_summary()
