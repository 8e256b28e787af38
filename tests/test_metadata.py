"""Activation statistics (Lopes et al. 2017's metadata): the streaming per-class moments equal numpy's, also when
split over processes and merged; the metadata file round-trips and refuses what is not its own in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from zskd_lightning.errors import ZSKDError
from zskd_lightning.metadata import ClassMoments, read_metadata, write_metadata
from zskd_lightning.metadata.file import LOGITS


def _data(n: int = 300, d: int = 5, k: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    values = torch.randn(n, d, generator=generator) * 3 + 100 + labels[:, None].float()  # a large offset
    return values.float(), labels


def _streamed(values, labels, kept="full", batch=17) -> ClassMoments:
    moments = ClassMoments(3, values.shape[1], kept)
    for start in range(0, len(values), batch):
        moments.update(values[start : start + batch], labels[start : start + batch])
    return moments


@pytest.mark.parametrize("kept", ["full", "diagonal"])
def test_streamed_moments_equal_numpys(kept):
    values, labels = _data()
    moments = _streamed(values, labels, kept)
    for k in range(3):
        x = values[labels == k].double().numpy()
        np.testing.assert_allclose(moments.mean[k].numpy(), x.mean(0), rtol=1e-12)
        covariance = np.cov(x, rowvar=False, bias=True)
        expected = covariance if kept == "full" else np.diag(covariance)
        np.testing.assert_allclose(moments.covariance()[k].numpy(), expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(moments.std()[k].numpy(), x.std(0), rtol=1e-9)
    assert moments.count.tolist() == [100, 100, 100]


def test_two_processes_merged_equal_one():
    values, labels = _data()
    whole = _streamed(values, labels)
    first, second = _streamed(values[:130], labels[:130]), _streamed(values[130:], labels[130:], batch=50)
    first.merge(second)
    assert torch.equal(first.count, whole.count)
    torch.testing.assert_close(first.mean, whole.mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(first.covariance(), whole.covariance(), rtol=1e-9, atol=1e-12)


def test_a_class_with_fewer_than_two_samples_is_one_line():
    moments = ClassMoments(3, 2)
    moments.update(torch.randn(5, 2), torch.tensor([0, 0, 1, 1, 1]))
    with pytest.raises(ZSKDError, match=r"classes \[2\] have fewer than 2 recorded samples"):
        moments.covariance()


def _write(path, kept="full"):
    values, labels = _data()
    layers = {"network.fc": _streamed(values, labels, kept), "network.conv": _streamed(values, labels, "diagonal"),
              LOGITS: _streamed(values[:, :3], labels)}
    size = write_metadata(path, layers, {"network.fc": [5], "network.conv": [5, 1, 1], LOGITS: [3]}, "a" * 64,
                          temperature=8.0)
    return layers, size


def test_the_metadata_file_round_trips(tmp_path):
    path = tmp_path / "teacher.metadata.safetensors"
    layers, size = _write(path)
    assert size == path.stat().st_size
    metadata = read_metadata(path, teacher_fingerprint="a" * 64)
    assert metadata.header["temperature"] == 8.0 and metadata.header["num_classes"] == 3
    fc, conv = metadata.layers["network.fc"], metadata.layers["network.conv"]
    assert fc.kept == "full" and fc.spread.shape == (3, 5, 5) and conv.kept == "diagonal" and conv.spread.shape == (3, 5)
    assert conv.shape == (5, 1, 1)
    assert torch.equal(fc.mean, layers["network.fc"].mean) and torch.equal(fc.spread, layers["network.fc"].covariance())
    assert read_metadata(path).sha256 == metadata.sha256 and len(metadata.sha256) == 64


def test_bad_metadata_files_end_in_one_line(tmp_path):
    path = tmp_path / "m.safetensors"
    _write(path)
    with pytest.raises(ZSKDError, match=f"recorded from teacher {'a' * 12}, not from this teacher \\({'b' * 12}\\)"):
        read_metadata(path, teacher_fingerprint="b" * 64)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ZSKDError, match="corrupt or truncated"):
        read_metadata(truncated)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ZSKDError, match="is not an activation metadata file"):
        read_metadata(other)
    with pytest.raises(ZSKDError, match="metadata file not found"):
        read_metadata(tmp_path / "absent.safetensors")
    header = json.dumps({"format": "zskd-activation-metadata", "version": 1, "teacher_fingerprint": "a" * 64})
    headless = tmp_path / "headless.safetensors"
    save_file({"x": torch.zeros(2)}, str(headless), metadata={"zskd": header})
    with pytest.raises(ZSKDError, match="lacks layers, num_classes, temperature in its header"):
        read_metadata(headless)
    header = read_metadata(path).header
    header["layers"]["network.fc"]["dim"] = 4  # the tensors hold 5 units
    misshapen = tmp_path / "misshapen.safetensors"
    save_file(load_file(str(path)), str(misshapen), metadata={"zskd": json.dumps(header)})
    with pytest.raises(ZSKDError, match=r"layer 'network.fc' has mean \[3, 5\], std \[3, 5\], covariance \[3, 5, 5\]; "
                                        r"expected mean \[3, 4\], std \[3, 4\], covariance \[3, 4, 4\] "
                                        r"\(num_classes 3, dim 4, kept 'full'\)$"):
        read_metadata(misshapen)
    header["layers"]["network.fc"].update(dim=5, kept="diagonal")  # a full covariance filed as a diagonal layer
    save_file(load_file(str(path)), str(misshapen), metadata={"zskd": json.dumps(header)})
    with pytest.raises(ZSKDError, match=r"lacks \['variance'\] of layer 'network.fc'$"):
        read_metadata(misshapen)
    header["num_classes"] = "3"
    save_file(load_file(str(path)), str(misshapen), metadata={"zskd": json.dumps(header)})
    with pytest.raises(ZSKDError, match=r"has num_classes '3' \(a positive integer expected\)"):
        read_metadata(misshapen)


def test_statistics_without_logits_are_not_written(tmp_path):
    values, labels = _data()
    with pytest.raises(ZSKDError, match=r"m.safetensors: no 'logits' statistics among \['network.fc'\]"):
        write_metadata(tmp_path / "m.safetensors", {"network.fc": _streamed(values, labels)}, {"network.fc": [5]},
                       "a" * 64, temperature=8.0)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("change, message", [
    (lambda h: h["layers"].pop(LOGITS), r"has no 'logits' statistics \(every Lopes objective matches them\); it "
                                        r"holds \['network.conv', 'network.fc'\]$"),
    (lambda h: h.update(temperature=0), r"has temperature 0; expected a positive number$"),
    (lambda h: h["layers"]["network.conv"].update(shape=[5, 2]), r"layer 'network.conv' has shape \[5, 2\]; expected "
                                                                 r"a list of positive integers whose product is its dim 5$"),
    (lambda h: h["layers"]["network.conv"].update(shape=5), r"layer 'network.conv' has shape 5; expected a list"),
])
def test_metadata_a_lopes_objective_cannot_use_is_refused_in_one_line(tmp_path, change, message):
    path, changed = tmp_path / "m.safetensors", tmp_path / "changed.safetensors"
    _write(path)
    header = read_metadata(path).header
    change(header)
    tensors = {k: v for k, v in load_file(str(path)).items() if k.split("/")[0] in header["layers"]}
    save_file(tensors, str(changed), metadata={"zskd": json.dumps(header)})
    with pytest.raises(ZSKDError, match=message):
        read_metadata(changed)
