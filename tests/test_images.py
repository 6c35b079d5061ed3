"""Pixels against transformers' CLIPImageProcessor (after LLaVA's convert('RGB') / expand2square)."""

import glob
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from minillavamed.data import ImageLoadError, ImageProcessor, load_image

VQA_RAD = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "vqa-rad")


def clip(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def llava_pixels(rgb, hf, aspect):
    """LLaVA's train.py: expand2square with int(mean*255) in pad mode, then processor.preprocess."""
    if aspect == "pad":
        w, h = rgb.size
        bg = tuple(int(x * 255) for x in hf.image_mean)
        if w != h:
            sq = Image.new(rgb.mode, (max(w, h),) * 2, bg)
            sq.paste(rgb, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
            rgb = sq
    return torch.as_tensor(np.asarray(hf.preprocess(rgb, return_tensors="np")["pixel_values"][0]))


def random_image(rng, mode, w, h):
    if mode in ("RGB", "RGBA", "CMYK"):
        return Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)
    if mode == "P":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P")
    if mode == "LA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 2), dtype=np.uint8), "LA")
    return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")


SIZES = [(1, 1), (7, 5), (224, 224), (300, 200), (199, 401), (300, 3), (2, 90)]  # elongated but cheap


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 336])
@pytest.mark.parametrize("aspect", ["crop", "pad"])
def test_pixels_equal_clip_image_processor(size, aspect):
    rng = np.random.default_rng(size)
    ours, hf = ImageProcessor.for_model(size, aspect), clip(size)
    for k, (w, h) in enumerate(SIZES):
        for mode in ("RGB", "RGBA", "L", "P", "LA", "CMYK"):
            if mode != "RGB" and k % 2:
                continue  # every mode on some sizes, to keep the test quick
            im = random_image(rng, mode, w, h)
            got = ours(im)
            want = llava_pixels(im.convert("RGB"), hf, aspect)
            assert got.shape == (3, size, size) and got.dtype == torch.float32
            assert (got - want).abs().max().item() <= 1e-5, (mode, w, h)


def test_pixels_equal_on_vqa_rad_images():
    files = sorted(glob.glob(os.path.join(VQA_RAD, "images", "*.jpg")))
    if not files:
        pytest.skip(f"VQA-RAD not found at {os.path.abspath(VQA_RAD)}")
    for size, aspect in ((336, "pad"), (224, "crop")):
        ours, hf = ImageProcessor.for_model(size, aspect), clip(size)
        for f in files[::40]:
            got = ours(load_image(f))
            want = llava_pixels(Image.open(f).convert("RGB"), hf, aspect)
            assert (got - want).abs().max().item() <= 1e-5, f


def test_sixteen_bit_grey_is_stretched_not_clipped(tmp_path):
    a = np.array([[0, 1000], [3000, 4000]], dtype=np.uint16)  # a 12-bit CT slice, say
    Image.fromarray(a).save(tmp_path / "ct.png")
    im = load_image(tmp_path / "ct.png")
    assert im.mode == "RGB"
    assert np.asarray(im)[..., 0].tolist() == [[0, 64], [191, 255]]  # .convert('RGB') would give 0/255 only
    f32 = Image.fromarray(np.full((4, 4), 7.5, dtype=np.float32))  # flat: no range to stretch
    assert np.asarray(ImageProcessor.for_model(224, "pad")(f32)).shape == (3, 224, 224)


def test_rgba_drops_alpha_as_llava_does(tmp_path):
    Image.new("RGBA", (4, 4), (200, 10, 10, 0)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (200, 10, 10)  # not composited on white


def test_exif_rotation_is_not_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (40, 20)  # stored orientation, as LLaVA and HF see it


def test_bad_images_name_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(ImageLoadError, match="junk.jpg"):
        load_image(tmp_path / "junk.jpg")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:200])  # truncated
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(ValueError, match="aspect"):
        ImageProcessor(aspect="keep")
