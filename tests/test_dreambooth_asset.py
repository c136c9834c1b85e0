"""`class_images` and `dreambooth` as assets on a small copy of the demo dataset: a "not trained" record when
the dataset does not list dreambooth, class images cached across materialisations, a two-step fine-tune."""

from __future__ import annotations

import shutil

import pytest
from dagster import AssetKey, instance_for_test, materialize

from assets.class_images import class_images
from assets.dreambooth import dreambooth
from assets.partitions import datasets_partitions
from resources import BaseModelResource, TorchDevice
from tests.helpers import edit_settings

DATASET = "few"


def _project(project, embedded_root):
    defs, paths = project
    folder = paths.dataset_dir(DATASET)
    folder.mkdir(parents=True)
    for image in sorted((embedded_root / "datasets" / "demo").glob("*.png"))[:4]:
        shutil.copy(image, folder / image.name)
    shutil.copy(embedded_root / "datasets" / "demo" / "dataset.yaml", folder / "dataset.yaml")
    edit_settings(folder, "preprocess", flip=False, min_images=1)
    edit_settings(folder, "training", batch_size=2)
    resources = {"paths": paths, "base_model": BaseModelResource(path=str(embedded_root / "models" / "tiny-sd")),
                 "device": TorchDevice(device="cpu", precision="fp32")}  # fmt: skip
    return defs, paths, folder, resources


def _latest(instance, key: str):
    event = instance.get_latest_materialization_event(AssetKey(key))
    return None if event is None else event.asset_materialization


@pytest.mark.slow
def test_class_images_then_dreambooth_and_a_record_when_not_listed(project, embedded_root) -> None:
    defs, paths, folder, resources = _project(project, embedded_root)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, [DATASET])
        job = defs.resolve_implicit_global_asset_job_def()
        prepared = job.execute_in_process(instance=instance, partition_key=DATASET, asset_selection=[
            AssetKey("prepared_images"), AssetKey("tag_scores"), AssetKey("tag_table")])  # fmt: skip
        assert prepared.success

        def run():
            return materialize([class_images, dreambooth], instance=instance, partition_key=DATASET,
                               resources=resources)  # fmt: skip

        assert run().success  # textual inversion only (the default): nothing trained or rendered, not failed
        assert _latest(instance, "class_images").metadata["images"].value == 0
        assert _latest(instance, "dreambooth").metadata["trained"].value is False
        assert not (paths.data_root() / DATASET / "class_images").exists()

        edit_settings(folder, "training", methods=["textual_inversion", "dreambooth"])
        edit_settings(folder, "dreambooth", class_prompt="a photo of a character", num_class_images=2,
                      class_steps=2, max_steps=2, learning_rate=1e-4)  # fmt: skip
        assert run().success
        images = _latest(instance, "class_images").metadata
        assert (images["images"].value, images["processed"].value, images["reused"].value) == (2, 2, 0)
        assert "class_image_0" in images
        trained = _latest(instance, "dreambooth").metadata
        assert trained["steps"].value == 2 and trained["class_images"].value == 2
        out = paths.data_root() / DATASET / "dreambooth"
        name = trained["instance_token"].value
        assert trained["single_file"].value == str(out / f"{name}.safetensors")
        assert (out / name / "model_index.json").is_file() and (out / "loss.png").is_file()

        assert run().success  # cached: no class image is rendered again
        images = _latest(instance, "class_images").metadata
        assert (images["processed"].value, images["reused"].value) == (0, 2)

        edit_settings(folder, "dreambooth", prior_preservation=False)
        assert run().success
        assert "prior preservation off" in _latest(instance, "class_images").metadata["skipped"].value
        assert _latest(instance, "dreambooth").metadata["class_images"].value == 0
        assert len(list((paths.data_root() / DATASET / "class_images").glob("*.png"))) == 2  # kept for later


def test_dreambooth_settings_override_the_training_section() -> None:
    from dagster import Failure

    from assets.dataset_settings import DatasetSettings
    from assets.dreambooth import dreambooth_settings

    settings = DatasetSettings.model_validate({
        "training": {"embedding_name": "mychar", "batch_size": 3, "learning_rate": 0.005, "max_steps": 1000},
        "dreambooth": {"class_prompt": "a photo of a dog", "learning_rate": 2e-6, "max_steps": 50,
                       "text_encoder_lr": 1e-6, "train_text_encoder": True, "prior_loss_weight": 0.5},
    })  # fmt: skip
    loop, options = dreambooth_settings(settings, "dogs", "adamw")
    assert (loop.name, loop.learning_rate, loop.max_steps, loop.batch_size) == ("mychar", "2e-06", 50, 3)
    assert options.text_encoder_lr_scale == pytest.approx(0.5) and options.prior_loss_weight == 0.5
    token = DatasetSettings.model_validate({"dreambooth": {"instance_token": "sks", "prior_preservation": False}})
    assert dreambooth_settings(token, "dogs", "adamw")[0].name == "sks"
    with pytest.raises(Failure, match="dreambooth section: prior preservation needs a class prompt"):
        dreambooth_settings(DatasetSettings(), "dogs", "adamw")
