"""The impression grid: one labelled row per class, small images enlarged, and the grid sent to image loggers."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny
from PIL import Image

from zskd_lightning.impressions.pictures import impression_grid
from zskd_lightning.pictures import log_picture, publish_picture


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grid")
    _, datamodule = tiny.run_synthesis(folder / "cache", grid=True, num_impressions=40)
    assert (folder / "impressions.png").is_file()
    return datamodule.impression_plan.cache_for(tiny.make_net(0)), folder


def test_the_grid_has_a_labelled_row_per_class_of_enlarged_images(cache):
    cache, folder = cache
    picture = impression_grid(cache, tiny.digits_input_range(), per_class=4)
    cell = 8 * 8 + 2  # 8x8 digits enlarged 8x to reach 64 px, 2 px padding
    assert picture.height == 2 + 10 * cell
    assert picture.width > 2 + 4 * cell  # the label margin on the left
    margin = np.asarray(picture)[:, :60]
    assert (margin < 128).any(), "the class labels are drawn in the margin"
    written = Image.open(folder / "impressions.png")
    assert written.size == impression_grid(cache, tiny.digits_input_range()).size


def test_the_grid_goes_to_loggers_that_take_images():
    picture = Image.new("RGB", (10, 6))
    calls = []

    class TensorBoardLike:
        class experiment:  # noqa: N801 - mimics TensorBoardLogger.experiment
            @staticmethod
            def add_image(tag, array, global_step, dataformats):
                calls.append(("tb", tag, array.shape, dataformats))

    class ImageLogger:
        experiment = None

        def log_image(self, key, images, step):
            calls.append(("log_image", key, len(images)))

    class CSVLike:
        experiment = object()

    log_picture([TensorBoardLike(), ImageLogger(), CSVLike()], "impressions", picture)
    assert calls == [("tb", "impressions", (6, 10, 3), "HWC"), ("log_image", "impressions", 1)]


def test_a_logger_that_fails_leaves_the_written_picture_and_a_warning(tmp_path):
    """Rank 0 alone publishes pictures: a failed upload is a warning naming what happened, the PNG stays."""

    class FailingUpload:
        experiment = None

        def log_image(self, key, images, step):
            raise ConnectionError("upload refused")

    path = str(tmp_path / "grid.png")
    with pytest.warns(UserWarning, match=r"the impressions picture \(.*grid.png\) did not reach the loggers: "
                                         r"ConnectionError: upload refused"):
        assert publish_picture(lambda: Image.new("RGB", (10, 6)), path, [FailingUpload()], "impressions") == path
    assert Image.open(path).size == (10, 6)
