"""DreamBooth data: folders checked with errors naming them, mixed images converted with a note, crops and flips with
SDXL's micro-conditioning coordinates, instance-then-class batches."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from modalpeft.diffusion.data import DreamBoothDataModule, collate, crop_resize, load_images

from .pipelines import write_images


def test_empty_missing_and_non_image_folders_are_refused_by_name(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*holds no images"):
        load_images(empty)
    with pytest.raises(ValueError, match="nowhere.*is not a folder"):
        load_images(tmp_path / "nowhere")
    photos = write_images(tmp_path / "photos", 2)
    (photos / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"photos.*not images: \['notes.txt'\]"):
        load_images(photos)
    data = DreamBoothDataModule(str(empty), "a photo of sks dog")
    with pytest.raises(ValueError, match="holds no images"):
        data.prepare_data()


def test_mixed_modes_and_sizes_are_converted_with_a_note(tmp_path) -> None:
    folder = write_images(tmp_path / "photos", 1, size=24)
    Image.new("L", (40, 30), 128).save(folder / "grey.png")
    Image.new("RGBA", (30, 50), (10, 20, 30, 40)).save(folder / "alpha.png")
    with pytest.warns(UserWarning, match=r"modes \['L', 'RGB', 'RGBA'\] are converted to RGB; images of 3 sizes "):
        images = load_images(folder)
    assert [image.mode for image in images] == ["RGB"] * 3
    data = DreamBoothDataModule(str(folder), "a photo of sks dog", resolution=16, batch_size=3)
    with pytest.warns(UserWarning, match="converted"):
        data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["pixel_values"].abs().max() <= 1
    assert sorted(batch["original_sizes"].tolist()) == [[24, 24], [30, 40], [50, 30]]


def test_rgb_images_of_different_sizes_get_a_note_and_one_size_none(tmp_path, recwarn) -> None:
    folder = write_images(tmp_path / "photos", 2, size=24)
    assert [image.size for image in load_images(folder)] == [(24, 24)] * 2 and not recwarn.list
    Image.new("RGB", (40, 30), (1, 2, 3)).save(folder / "wide.png")
    with pytest.warns(UserWarning, match=r"2 sizes \(24x24, 40x30\) are each resized") as caught:
        images = load_images(folder)
    assert "modes" not in str(caught[0].message) and sorted(image.size for image in images)[-1] == (40, 30)


def test_the_identifier_is_found_beside_punctuation_and_not_inside_words(tmp_path, recwarn) -> None:
    folder = str(write_images(tmp_path / "photos", 1))
    DreamBoothDataModule(folder, "a photo of sks, a dog")
    DreamBoothDataModule(folder, "a photo of <v> dog", identifier="<v>")
    assert not recwarn.list
    with pytest.warns(UserWarning, match="does not hold the identifier 'sks'"):
        DreamBoothDataModule(folder, "a photo of a sksdog")


def test_prompt_without_the_identifier_warns_and_prior_needs_both_fields(tmp_path) -> None:
    folder = str(write_images(tmp_path / "photos", 1))
    with pytest.warns(UserWarning, match="does not hold the identifier 'sks'"):
        DreamBoothDataModule(folder, "a photo of a dog")
    with pytest.raises(ValueError, match="both class_dir and class_prompt"):
        DreamBoothDataModule(folder, "a photo of sks dog", class_dir=str(tmp_path / "cls"))
    with pytest.raises(ValueError, match="resolution=0"):
        DreamBoothDataModule(folder, "a photo of sks dog", resolution=0)


def test_crop_coordinates_and_flip() -> None:
    image = Image.new("RGB", (40, 20))  # width 40, height 20
    image.putpixel((0, 0), (255, 0, 0))
    pixels, original, crop = crop_resize(image, 10, center_crop=True, flip=False)
    assert original == (20, 40) and crop == (0, 5) and pixels.shape == (3, 10, 10)  # resized to 10 x 20, centre crop
    pixels, _, crop = crop_resize(image, 10, center_crop=False, flip=True, generator=torch.Generator().manual_seed(0))
    top, left = crop
    assert top == 0 and 0 <= left <= 10  # the crop's left edge in the flipped (resized) image
    _, _, crop = crop_resize(image, 20, center_crop=True, flip=True)
    assert crop == (0, 40 - 10 - 20)
    square = Image.new("RGB", (20, 20))
    square.putpixel((0, 0), (255, 0, 0))
    pixels, _, crop = crop_resize(square, 20, center_crop=True, flip=True)
    assert crop == (0, 0) and pixels[0, 0, -1] > pixels[0, 0, 0]  # the red corner moved to the right


def test_batches_put_instance_examples_before_class_examples(tmp_path) -> None:
    instance = write_images(tmp_path / "photos", 2)
    classes = write_images(tmp_path / "cls", 3, seed=1)
    data = DreamBoothDataModule(
        str(instance), "a photo of sks dog", class_dir=str(classes), class_prompt="a photo of dog",
        num_class_images=3, resolution=8, batch_size=2,
    )  # fmt: skip
    data.prepare_data()  # enough class images: nothing to generate, no task needed
    data.setup("fit")
    assert len(data.dataset) == 3
    batch = next(iter(data.train_dataloader()))
    assert batch["prompts"] == ["a photo of sks dog"] * 2 + ["a photo of dog"] * 2 and batch["num_instance"] == 2
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    items = [data.dataset[0], data.dataset[1]]
    assert collate(items)["prompts"] == batch["prompts"]


def test_missing_class_images_need_a_dreambooth_task(tmp_path) -> None:
    instance = write_images(tmp_path / "photos", 1)
    data = DreamBoothDataModule(
        str(instance), "a photo of sks dog", class_dir=str(tmp_path / "cls"), class_prompt="a dog", num_class_images=2
    )
    with pytest.raises(ValueError, match="holds 0 of num_class_images=2 images"):
        data.prepare_data()
