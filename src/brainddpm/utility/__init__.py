"""Stage 7, utility: does a model trained with synthetic scans do better on real ones?

The distribution metrics of the evaluation stage compare synthetic and real volumes as sets; this stage
asks the user's question with a downstream task. A target covariate (diagnosis, age, ...) is predicted
from the volumes by small downstream models trained on different training sets, the arms (`arms`:
real only, synthetic only, real plus synthetic at several ratios, real plus classical augmentation, real
with the minority class oversampled), all for the same number of optimizer steps and all scored on the
same test set: the validation split, which neither the generator nor the downstream models saw.
`downstream` holds the models (a small MONAI 3D CNN and a PCA + linear baseline), `labels` reads volumes
with their target, `protocol` runs one arm for one repeat and gathers every part into metrics with
subject-level bootstrap CIs and paired differences against real only, and `two_sample` is a realism
probe: a classifier two-sample test of real against synthetic volumes (0.5 = indistinguishable).
"""
