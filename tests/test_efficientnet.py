"""The pre-trained EfficientNet-Lite0 backbone: the packaged ImageNet weights load with the strict
check and classify real photographs as ImageNet classes; on a frozen pre-trained backbone,
federated prototype averaging (SimpleCIL's setting) equals the central class means."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulator.learner.backbones import PretrainedError, build_model, read_pretrained
from simulator.learner.efficientnet import IMAGE_SIZE, to_network_input

# no importorskip: the weights package is in the test extra, so a missing one must fail here

# ImageNet-1k class indices (the standard synset order)
PALACE, MONASTERY, DAISY = 698, 663, 985


def _photos() -> torch.Tensor:
    """scikit-learn's two sample photographs (a Chinese palace, a flower), centre-cropped square."""
    from sklearn.datasets import load_sample_images

    out = []
    for img in load_sample_images().images:
        h, w = img.shape[:2]
        s = min(h, w)
        crop = np.array(img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s], dtype=np.float32) / 255
        out.append(torch.from_numpy(crop).permute(2, 0, 1))
    return torch.stack(out)


def test_packaged_imagenet_weights_load_strictly_and_recognise_photographs():
    state = read_pretrained("imagenet", "efficientnet_lite0")
    model = build_model("efficientnet_lite0", (3, 32, 32), 1280, 10, False, 0, pretrained=state)
    assert model.backbone.proj is None  # embedding_dim 1280: the pooled feature itself
    net = model.backbone.net.eval()
    with torch.no_grad():
        probs = torch.softmax(net(to_network_input(_photos())), dim=1)
    top3 = probs.topk(3).indices.tolist()
    assert PALACE in top3[0][:2] or MONASTERY in top3[0][:2], top3[0]
    assert top3[1][0] == DAISY, top3[1]
    # the backbone's embedding is the network's pooled feature of the same input
    with torch.no_grad():
        assert torch.allclose(model.backbone(_photos()), net.features(to_network_input(_photos())))


def test_input_handling_undoes_scalar_standardisation_and_fills_rgb():
    x = torch.rand(2, 1, 8, 8)
    a, b = to_network_input(x), to_network_input(3.0 * x - 7.0)
    assert a.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="1 or 3"):
        to_network_input(torch.rand(2, 2, 8, 8))


def test_weights_that_do_not_fit_are_refused_by_name():
    state = read_pretrained("imagenet", "efficientnet_lite0")
    state.pop("net._conv_head.weight")
    with pytest.raises(PretrainedError, match="missing keys: net._conv_head.weight"):
        build_model("efficientnet_lite0", (3, 32, 32), 1280, 10, False, 0, pretrained=state)
    with pytest.raises(PretrainedError, match="backbone cnn ships no 'imagenet' weights"):
        read_pretrained("imagenet", "cnn")


def _npz(tmp_path, rng) -> str:
    """Four classes of small colour images, each class a different mean colour."""
    y = np.repeat(np.arange(4), 12)
    colours = rng.uniform(0, 255, size=(4, 3))
    x = np.clip(colours[y][:, :, None, None] + rng.normal(0, 40, size=(len(y), 3, 16, 16)), 0, 255).astype(np.uint8)
    path = tmp_path / "colours.npz"
    np.savez(path, x=x, y=y)
    return str(path)


def test_simplecil_federated_prototypes_equal_the_central_class_means(tmp_path):
    """SimpleCIL on a frozen pre-trained backbone: clients upload class sums and counts, the
    server's merge is the central class mean of the embeddings (to float precision)."""
    from helpers import tiny
    from simulator.engine.runner import run_scenario
    from simulator.scenario import validate_scenario

    raw = tiny(dataset={"source": "npz", "path": _npz(tmp_path, np.random.default_rng(0)), "test_fraction": 0.25},
               tasks={"initial_classes": 2, "classes_per_task": 2},
               clients={"num_clients": 3, "partition": {"scheme": "dirichlet", "alpha": 0.5, "min_size": 2}},
               model={"backbone": "efficientnet_lite0", "embedding_dim": 1280, "pretrained": "imagenet"},
               continual={"backbone": "frozen", "memory_per_class": 0},
               strategy={"name": "proto_avg", "params": {"share_weights": False}},
               training={"rounds_per_task": 1, "local_epochs": 1, "batch_size": 16, "lr": 0.01})
    run = run_scenario(validate_scenario(raw), run_dir=tmp_path / "run", plots=False, out=None)
    assert run.summary["completed"]
    glob = np.load(tmp_path / "run" / "final" / "global.npz")
    from simulator.data.stream import build_stream

    stream = build_stream(validate_scenario(raw))
    model = build_model("efficientnet_lite0", stream.dataset.input_shape, 1280, 4, False, 0,
                        pretrained=read_pretrained("imagenet", "efficientnet_lite0")).eval()
    with torch.no_grad():
        z = model.backbone(torch.as_tensor(stream.dataset.x_train)).double().numpy()
    for c, v in zip(glob["proto.classes"], glob["proto.vectors"]):
        central = z[stream.dataset.y_train == c].mean(axis=0)
        assert np.abs(v - central).max() <= 1e-4 * max(1.0, np.abs(central).max()), c
