"""Brain masks for synthetic volumes (brainddpm.sampling.background): the rule chosen on real training volumes
keeps their brains, and sets a hazy volume's background to exactly 0."""

import numpy as np
import pytest

from brainddpm.data.demo import write_cohort
from brainddpm.data.nifti import preprocess
from brainddpm.data.shards import write_index, write_shard
from brainddpm.errors import BadInputError
from brainddpm.sampling.background import brain_mask, choose_mask_rule, mask_background, run_mask_rule


@pytest.fixture(scope="module")
def real_volumes(tmp_path_factory):
    """Six demo-cohort brains at the demo's 24x32x24, as the shards hold them (background exactly 0)."""
    from brainddpm.arguments import load_config_files
    from helpers import ROOT

    data = load_config_files([ROOT / "config" / "config.yaml", ROOT / "config" / "demo.yaml"])["data"]
    paths = write_cohort(6, 3, tmp_path_factory.mktemp("cohort"), progress=False)
    return np.stack([preprocess(p, data)[0] for p in paths])


def test_the_rule_chosen_on_training_volumes_keeps_over_99_percent_of_each_brain(real_volumes, tmp_path):
    train, held = real_volumes[:4], real_volumes[4:]
    rule = choose_mask_rule(train)
    print(f"rule: threshold {rule['threshold']}, dilate {rule['dilate']}, worst kept {rule['worst_kept']}, "
          f"background added {rule['background_added']}")
    assert rule["worst_kept"] >= 0.995 and rule["volumes"] == 4
    for vol in held:  # volumes the rule was not chosen on
        mask = brain_mask(vol, rule["threshold"], rule["dilate"])
        brain = vol > 0
        print(f"held-out brain kept: {(mask & brain).sum() / brain.sum():.4f}")
        assert (mask & brain).sum() / brain.sum() > 0.99
    # the command reads a training split's shards and writes the rule
    summary = write_shard(tmp_path / "train" / "shard-0000.h5", train, [{"subject": f"s{i}"} for i in range(4)],
                          np.eye(4))
    write_index("train", [summary], tmp_path / "train" / "index.json")
    written = run_mask_rule(tmp_path / "train", tmp_path / "mask_rule.json")
    assert (written["threshold"], written["dilate"]) == (rule["threshold"], rule["dilate"])


def test_a_hazy_volume_gets_a_background_of_exactly_0_and_keeps_its_brain(real_volumes):
    rule = choose_mask_rule(real_volumes[:4])
    vol = real_volumes[5]
    brain = vol > 0
    rng = np.random.default_rng(0)
    hazy = np.where(brain, vol, rng.uniform(0.0, 0.08, vol.shape)).astype(np.float32)  # the demo's haze: ~0.04
    hazy[1:4, 1:4, 1:4] = 0.7  # a bright blob in a corner, apart from the brain
    masked, mask = mask_background(hazy, rule)
    from scipy import ndimage

    far = ~ndimage.binary_dilation(brain, iterations=2)
    assert np.all(masked[far] == 0.0) and masked[1:4, 1:4, 1:4].max() == 0.0
    assert (mask.astype(bool) & brain).sum() / brain.sum() > 0.99
    assert np.array_equal(masked[mask.astype(bool)], hazy[mask.astype(bool)])  # inside the mask: untouched
    print(f"haze outside the brain: {hazy[~brain].mean():.4f} before, {masked[~brain].mean():.5f} after")


def test_brains_no_rule_can_keep_get_a_named_error():
    vols = np.zeros((2, 12, 12, 12), np.float32)
    vols[:, 3:9, 3:9, 3:9] = 0.005  # dimmer than every threshold of the grid
    with pytest.raises(BadInputError, match="no mask rule of the grid keeps 99.5 % .* sample.background: keep"):
        choose_mask_rule(vols)
