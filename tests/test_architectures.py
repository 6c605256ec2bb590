"""The generic test: every registered architecture's examples, built through GaNDLF's own `get_model`."""

from __future__ import annotations

import io

import pytest
import torch

from gandlf_dimlift.models.builder import Architecture
from gandlf_dimlift.registry import load_entries


def _examples():
    for entry in sorted(load_entries(), key=lambda e: e.key):
        if isinstance(entry.builder, Architecture):
            for index, example in enumerate(entry.builder.examples):
                label = f"{entry.key}-{example.problem_type}-{example.dimension}d-{index}"
                yield pytest.param(entry.key, example, id=label)


def _parameters(key, example) -> dict:
    model = {
        "architecture": key,
        "dimension": example.dimension,
        "num_channels": example.in_channels,
        "class_list": list(range(example.n_outputs)),
        "final_layer": "none" if example.problem_type == "regression" else "softmax",
        "norm_type": "batch",
        "amp": False,
        "base_filters": 32,
        **example.options,
    }
    if example.problem_type == "regression":
        model["num_classes"] = example.n_outputs
    return {"model": model, "patch_size": list(example.patch_size), "problem_type": example.problem_type,
            "batch_size": 2}


def test_every_registered_architecture_declares_examples():
    import GANDLF.models  # noqa: F401 - the hook registers on this import

    from gandlf_dimlift.registry import registered

    keys = sorted(registered())
    assert {"dimlift_smp", "dimlift_dxnet", "dimlift_omnianet", "dimlift_slice_attention"} <= set(keys)
    for key in keys:
        builder = registered()[key].builder
        assert isinstance(builder, Architecture) and builder.examples, f"{key} declares no examples"
        problems = {e.problem_type for e in builder.examples}
        assert problems == set(builder.problem_types), f"{key}: examples cover {problems}"
        assert {e.dimension for e in builder.examples} == set(builder.dimensions), f"{key}: dimensions"


@pytest.mark.parametrize("key,example", list(_examples()))
def test_architecture_contract(key, example):
    from GANDLF.models import get_model

    torch.manual_seed(0)
    parameters = _parameters(key, example)
    model = get_model(parameters)
    x = torch.randn(2, example.in_channels, *example.patch_size)
    model.train()
    y = model(x)
    expected = (2, example.n_outputs, *example.patch_size) if example.problem_type == "segmentation" else (
        2, example.n_outputs)
    assert isinstance(y, torch.Tensor) and tuple(y.shape) == expected
    assert torch.isfinite(y).all()
    (y.float() ** 2).mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:10]}"

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    twin = get_model(_parameters(key, example))
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    model.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), twin(x), atol=1e-5)


@pytest.mark.parametrize("key,example", list(_examples()))
def test_weight_transfer(key, example, tmp_path):
    """One weights loader for every architecture: a GaNDLF checkpoint of the same model loads whole, and a state
    dict of its encoder alone (as a pretrained 2D classifier is) loads the encoder and nothing else. The random
    start that wrote them renormalised its encoder's batch norms (`norms.renormalize_a_random_start`)."""
    from GANDLF.models import get_model

    from gandlf_dimlift.registry import registered

    architecture = registered()[key].builder
    parameters = _parameters(key, example)
    torch.manual_seed(0)
    source = get_model(parameters)
    with torch.no_grad():  # trained weights: none equals an initialisation (zero-initialised heads included)
        for parameter in source.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    checkpoint = tmp_path / f"{key}_best.pth.tar"
    torch.save({"model_state_dict": source.state_dict(),
                "parameters": {"model": {"architecture": key, "dimension": example.dimension}}}, checkpoint)
    encoder_path = architecture.parts(source).encoder
    plain = [name for name, module in source.get_submodule(encoder_path).named_modules()
             if type(module) in (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)]  # exact: BatchRenorm subclasses them
    assert not plain, f"a random start's encoder trains its batch norms with their running statistics: {plain[:3]}"
    encoder_file = tmp_path / "encoder.pth"
    torch.save(source.get_submodule(encoder_path).state_dict(), encoder_file)

    torch.manual_seed(1)
    whole = get_model({**parameters, "model": {**parameters["model"], "pretrained": str(checkpoint)}})
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in whole.state_dict().items())
    torch.manual_seed(1)
    encoder_only = get_model({**parameters, "model": {**parameters["model"], "pretrained": str(encoder_file)}})
    loaded = encoder_only.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items() if k.startswith(encoder_path + "."))
    rest = [name for name, _ in source.named_parameters() if not name.startswith(encoder_path + ".")]
    assert rest and all(not torch.equal(loaded[k], source.state_dict()[k]) for k in rest)


@pytest.mark.parametrize("key,example", [p for p in _examples() if p.values[1].problem_type == "segmentation"])
def test_segmentation_output_starts_at_the_training_labels_class_shares(key, example, tmp_path):
    """GaNDLF hands the builder its training table: the output bias starts at the labels' log-prior (softmax) or
    log-odds (sigmoid); not when patches are sampled around labels, nor when a file gave the output layer."""
    import SimpleITK as sitk
    from GANDLF.models import get_model
    from GANDLF.utils import parseTrainingCSV

    from gandlf_dimlift.models.label_prior import FLOOR, output_layer
    from gandlf_dimlift.registry import registered
    from gandlf_dimlift.synthetic import write_dataset

    csv = write_dataset(tmp_path / "data", "segmentation", n_subjects=3, shape=tuple(example.patch_size), seed=0)
    table, headers = parseTrainingCSV(str(csv), train=True)
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(p)) for p in table["Label"]]
    voxels = sum(a.size for a in labels)
    shares = torch.tensor([sum(float((a == c).sum()) for a in labels) / voxels
                           for c in range(example.n_outputs)]).clamp(FLOOR, 1 - FLOOR)
    assert 0.01 < shares[1] < 0.5  # a foreground far from an even split: the prior matters

    def built(final_layer="softmax", sampler="uniform", pretrained=False):
        parameters = _parameters(key, example)
        parameters["model"].update(final_layer=final_layer, pretrained=pretrained)
        model = get_model({**parameters, "training_data": table, "headers": headers,
                           "patch_sampler": {"type": sampler}})
        head = registered()[key].builder.parts(model).head
        return model, output_layer(model, head, example.n_outputs).bias.detach().clone()

    model, bias = built()
    torch.testing.assert_close(bias, (shares.log() - shares.log().mean()).float())
    torch.testing.assert_close(built("sigmoid")[1], (shares / (1 - shares)).log().float())
    assert not built(sampler="label")[1].any()  # the family's own zero bias: every class equally likely
    with torch.no_grad():
        output_layer(model, registered()[key].builder.parts(model).head, example.n_outputs).bias.add_(1.0)
    checkpoint = tmp_path / f"{key}_best.pth.tar"
    torch.save({"model_state_dict": model.state_dict(),
                "parameters": {"model": {"architecture": key, "dimension": example.dimension}}}, checkpoint)
    torch.testing.assert_close(built(pretrained=str(checkpoint))[1], bias + 1.0)


def test_class_shares_read_any_label_type_and_gandlfs_combined_classes(tmp_path):
    import numpy as np
    import pandas as pd
    import SimpleITK as sitk

    from gandlf_dimlift.models.label_prior import training_class_shares

    paths = []
    for dtype in (np.uint8, np.uint16, np.int16, np.float32):
        label = np.zeros((8, 8, 8), dtype)
        label[:2], label[2] = 1, 2  # shares: 0 -> 5/8, 1 -> 2/8, 2 -> 1/8
        paths.append(str(tmp_path / f"{np.dtype(dtype).name}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(label), paths[-1])
    table = pd.DataFrame({"SubjectID": range(4), "Channel_0": paths, "Label": paths})
    parameters = {"training_data": table, "headers": {"labelHeader": 2}, "model": {"class_list": [0, 1, "1||2"]}}
    assert training_class_shares(parameters) == ([0.625, 0.25, 0.375], 4)
