"""The downstream models that learn the target: a small 3D CNN and a closed-form linear baseline.

The CNN (MONAI's `Classifier` or `Regressor`, sized by utility.cnn.channels and .strides) trains with
Adam for a fixed number of optimizer steps, whatever the size of its training set, so that the arms
differ in data and not in compute. Its initial weights and its batches come from seeded generators, so
on a CPU a run is the same every time. The CNN runs on a free GPU where one is visible (a cluster's
utility_part jobs), else on the CPU (`device`). `train_network` is deliberately one small function (network,
loss, data in; trained network out) that the project's shared training engine can take over later.

The baseline has no optimizer to tune: PCA of the flattened volumes, then logistic regression
(categorical target) or ridge regression (continuous), from scikit-learn. It tells whether a result
needs a deep model at all, and it is cheap enough to run in every part.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


def build_cnn(shape, outputs: int, channels, strides, categorical: bool, seed: int) -> torch.nn.Module:
    """A MONAI 3D CNN for volumes of `shape` (D, H, W) with `outputs` class logits or regression outputs;
    its weights drawn from `seed` (without touching the global random state)."""
    from monai.networks.nets import Classifier, Regressor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if categorical:
            return Classifier((1, *shape), classes=outputs, channels=channels, strides=strides)
        return Regressor((1, *shape), out_shape=(outputs,), channels=channels, strides=strides)


def device() -> torch.device:
    """Where the downstream CNNs run: a GPU that no other brainddpm job on this machine holds, else the CPU."""
    from brainddpm.device import pick_device

    return pick_device("auto")


def train_network(network: torch.nn.Module, loss_fn, images: np.ndarray, targets: np.ndarray, *, steps: int,
                  batch: int, lr: float, seed: int, on: torch.device | None = None) -> torch.nn.Module:
    """Train `network` for exactly `steps` Adam steps on batches drawn from (images, targets); return it.

    Batches walk through seeded random permutations of the training set (a new one each epoch), so every
    volume is seen equally often and the order depends only on `seed`. Runs on `on` (default: the CPU); the
    volumes stay in host memory and go to the device batch by batch."""
    on = on or torch.device("cpu")
    network.to(on)
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(targets))
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    network.train()
    order, position = torch.randperm(len(x), generator=generator), 0
    for _ in range(steps):
        if position + min(batch, len(x)) > len(x):
            order, position = torch.randperm(len(x), generator=generator), 0
        index = order[position:position + batch]
        position += len(index)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(network(x[index].to(on)), y[index].to(on))
        loss.backward()
        optimizer.step()
    network.eval()
    return network


@torch.no_grad()
def predict_network(network: torch.nn.Module, images: np.ndarray, categorical: bool, batch: int = 16) -> np.ndarray:
    """Class probabilities (N, C) or regression outputs (N,) of a trained network (on its own device)."""
    network.eval()
    on = next(network.parameters()).device
    outputs = [network(torch.from_numpy(np.ascontiguousarray(images[i:i + batch], dtype=np.float32)).to(on)).float()
               for i in range(0, len(images), batch)]
    out = torch.cat(outputs).cpu()
    return out.softmax(1).numpy() if categorical else out[:, 0].numpy()


def cnn_predictions(train_images, train_labels, test_images, categorical: bool, classes: int, cnn: dict,
                    seed: int) -> np.ndarray:
    """Build, train and apply the CNN of utility.cnn (channels, strides, steps, batch, lr)."""
    network = build_cnn(train_images.shape[2:], classes if categorical else 1, cnn["channels"], cnn["strides"],
                        categorical, seed)
    if categorical:
        loss = torch.nn.CrossEntropyLoss()
    else:
        mse = torch.nn.MSELoss()

        def loss(output, target):
            return mse(output[:, 0], target)
    train_network(network, loss, train_images, train_labels, steps=cnn["steps"], batch=cnn["batch"], lr=cnn["lr"],
                  seed=seed, on=device())
    return predict_network(network, test_images, categorical)


def linear_predictions(train_images, train_labels, test_images, categorical: bool, classes: int, linear: dict,
                       seed: int) -> np.ndarray:
    """PCA (utility.linear.components, at most one fewer than the training volumes) followed by logistic
    regression (probabilities (N, C)) or ridge regression (values (N,)), with regularisation utility.linear.c
    (the inverse strength of logistic regression) or utility.linear.alpha (ridge)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    components = max(1, min(linear["components"], len(train_labels) - 1))
    head = LogisticRegression(C=linear["c"], max_iter=2000) if categorical else Ridge(alpha=linear["alpha"])
    model = make_pipeline(PCA(n_components=components, random_state=seed), StandardScaler(), head)
    model.fit(train_images.reshape(len(train_images), -1), train_labels)
    flat = test_images.reshape(len(test_images), -1)
    if not categorical:
        return model.predict(flat).astype(np.float64)
    probabilities = np.zeros((len(flat), classes))
    probabilities[:, model.classes_] = model.predict_proba(flat)  # a class absent from training gets 0
    return probabilities


MODELS = {"cnn": cnn_predictions, "linear": linear_predictions}
