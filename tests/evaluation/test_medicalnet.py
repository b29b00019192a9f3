"""MedicalNet feature extractor: architecture, weight files in MedicalNet's format, features."""

import numpy as np
import pytest
import torch

from brainddpm.errors import BadInputError, BrainDDPMError
from brainddpm.evaluation import medicalnet as mn

SHAPE = (16, 20, 16)


def medicalnet_file(path, state):
    """Save like MedicalNet: {"state_dict": {"module.<key>": tensor}}, without num_batches_tracked."""
    sd = {f"module.{k}": v.clone() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": sd}, path)
    return path


@pytest.fixture(scope="module")
def reference():
    """A randomly initialised resnet10 with non-trivial BatchNorm statistics, and its weight file."""
    torch.manual_seed(0)
    model = mn.build_network("resnet10")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def weights(reference, tmp_path_factory):
    return medicalnet_file(tmp_path_factory.mktemp("w") / "resnet_10_23dataset.pth", reference.state_dict())


def volumes(n, seed):
    rng = np.random.default_rng(seed)
    v = rng.random((n, 1, *SHAPE)).astype(np.float32)
    v[..., :3, :, :] = 0  # background
    return v


def test_architecture_matches_medicalnet_layout(reference):
    sizes = {}
    hooks = [getattr(reference, n).register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, o.shape))
             for n in ("layer2", "layer4")]
    with torch.no_grad():
        out = reference(torch.zeros(1, 1, 32, 32, 32))
    for h in hooks:
        h.remove()
    # conv1 stride 2, maxpool 2, layer2 stride 2, then layer3/4 dilated with stride 1: 32 -> 4 -> 4
    assert sizes["layer2"][2:] == (4, 4, 4) and sizes["layer4"][1:] == (512, 4, 4, 4)
    assert out.shape == (1, mn.feature_size("resnet10")) == (1, 512)
    assert reference.layer4[0].conv1.dilation == (4, 4, 4)


def test_load_medicalnet_format_round_trip(reference, weights):
    loaded = mn.load_medicalnet("resnet10", weights)
    ref_state = reference.state_dict()
    for k, v in loaded.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(v, ref_state[k], rtol=0, atol=0)
    v = volumes(2, 0)
    feats = mn.extract_features(v, loaded, batch_size=2)
    with torch.no_grad():
        direct = reference(mn.zscore(torch.from_numpy(v))).double().numpy()
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-6)


def test_unwrapped_state_dict_without_prefix_also_loads(reference, tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(reference.state_dict(), path)
    loaded = mn.load_medicalnet("resnet10", path)
    torch.testing.assert_close(loaded.conv1.weight, reference.conv1.weight)


def test_wrong_architecture_is_refused(reference, tmp_path):
    state = dict(reference.state_dict())
    state["conv1.weight"] = torch.zeros(64, 3, 7, 7, 7)  # a 3-channel network
    with pytest.raises(BadInputError, match="shape mismatches.*conv1.weight"):
        mn.load_medicalnet("resnet10", medicalnet_file(tmp_path / "rgb.pth", state))
    state = dict(reference.state_dict())
    del state["layer4.0.conv2.weight"]
    state["conv_seg.0.weight"] = torch.zeros(2)
    with pytest.raises(BadInputError, match="missing keys.*layer4.0.conv2.weight.*unexpected keys.*conv_seg"):
        mn.load_medicalnet("resnet10", medicalnet_file(tmp_path / "seg.pth", state))
    with pytest.raises(BadInputError, match="resnet50 architecture"):
        mn.load_medicalnet("resnet50", medicalnet_file(tmp_path / "r10.pth", reference.state_dict()))


def test_missing_or_unreadable_weights(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(BadInputError, match="not found.*download_weights") as err:
        mn.load_medicalnet("resnet10", missing)
    assert err.value.path == str(missing)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BadInputError, match="cannot read"):
        mn.load_medicalnet("resnet10", junk)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(BadInputError, match="not a state dict"):
        mn.load_medicalnet("resnet10", tensor)
    with pytest.raises(ValueError, match="resnet18"):
        mn.build_network("resnet18")


def test_features_per_volume_normalised_and_batch_independent(reference):
    v = volumes(3, 1)
    f1 = mn.extract_features(v, reference, batch_size=1)
    f3 = mn.extract_features(torch.from_numpy(v), reference, batch_size=3)
    assert f1.shape == (3, 512) and f1.dtype == np.float64
    np.testing.assert_allclose(f1, f3, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mn.extract_features(v * 3.0, reference), f1, rtol=1e-4, atol=1e-5)
    assert not np.allclose(f1[0], f1[1], rtol=1e-3)


def test_zscore_uses_the_non_zero_voxels():
    v = torch.from_numpy(volumes(2, 2))
    z = mn.zscore(v)
    for i in range(2):
        fg = v[i] != 0
        assert z[i][fg].mean().item() == pytest.approx(0.0, abs=1e-5)
        assert z[i][fg].std(unbiased=False).item() == pytest.approx(1.0, rel=1e-5)
        assert torch.allclose(z[i][~fg], z[i][~fg][0])  # background: one constant value


def test_download_weights_from_file_url(tmp_path):
    src = tmp_path / "src.pth"
    src.write_bytes(b"abc" * 1000)
    dest = mn.download_weights(src.as_uri(), tmp_path / "sub" / "w.pth")
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(BrainDDPMError, match="cannot download"):
        mn.download_weights((tmp_path / "absent").as_uri(), tmp_path / "sub" / "x.pth")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["w.pth"]  # no partial file left
