"""Generated pictures: every upload gives a 28x28 digit or a clear InputError, never a crash.

The class of inputs behind the 500s: degenerate bounding boxes (a dot, a single row or column),
extreme aspect ratios whose ink shrinks to nothing, and odd modes/formats.
"""

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.errors import InputError, PayloadTooLarge
from service.inputs import pixels_from_image_bytes

SIDES = st.one_of(st.integers(1, 64), st.sampled_from([1, 2, 3, 5, 27, 28, 29, 511, 512, 513, 4000, 20000]))


@st.composite
def pictures(draw: st.DrawFn) -> bytes:
    width, height = draw(SIDES), draw(SIDES)
    if width * height > 400_000:
        height = max(1, 400_000 // width)
    background = draw(st.sampled_from([0, 255, 128]))
    ink = draw(st.sampled_from([0, 255, 100, 140]))
    array = np.full((height, width), background, np.uint8)
    for _ in range(draw(st.integers(0, 6))):
        array[draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))] = ink
    if draw(st.booleans()):
        array[draw(st.integers(0, height - 1)), :] = ink
    mode = draw(st.sampled_from(["L", "1", "RGB", "RGBA", "LA", "P", "I;16", "I", "F", "CMYK"]))
    fmt = draw(st.sampled_from(["PNG", "GIF", "BMP", "JPEG", "TIFF", "WEBP"]))
    image = Image.fromarray(array).convert(mode) if mode not in ("I;16",) else Image.fromarray(array.astype(np.uint16))
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt)
    except (OSError, ValueError, KeyError):  # this format cannot hold this mode: PNG always can
        buffer = io.BytesIO()
        image.convert("L").save(buffer, "PNG")
    return buffer.getvalue()


def _digit_or_input_error(data: bytes) -> None:
    try:
        pixels = pixels_from_image_bytes(data)
    except InputError as error:
        assert str(error)
        return
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pictures())
def test_every_generated_picture_gives_a_digit_or_an_input_error(data):
    _digit_or_input_error(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_give_an_input_error(data):
    _digit_or_input_error(data)


@settings(max_examples=100, deadline=None)
@given(pictures(), st.integers(0, 400))
def test_truncated_pictures_give_an_input_error(data, cut):
    _digit_or_input_error(data[: max(1, len(data) - cut)])


@pytest.mark.parametrize(("width", "height"), [(20000, 5), (5, 20000), (9000, 1), (1, 9000), (2, 2), (1, 1)])
def test_extreme_shapes_with_a_dot_at_each_end(width, height):
    """The reported crash: a 20,000x5 PNG of 198 bytes with one dark dot at each end."""
    array = np.full((height, width), 255, np.uint8)
    array[0, 0] = array[-1, -1] = 0
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    _digit_or_input_error(buffer.getvalue())


def test_pixel_budget_is_checked_from_the_header_before_decoding():
    buffer = io.BytesIO()
    Image.new("L", (12000, 12000), 255).save(buffer, "PNG")
    assert len(buffer.getvalue()) < 200_000  # 144 M pixels in ~165 KiB: a decompression bomb
    with pytest.raises(PayloadTooLarge, match=r"12000x12000 = 144,000,000 pixels; at most 1,000,000"):
        pixels_from_image_bytes(buffer.getvalue(), max_pixels=1_000_000)
    with pytest.raises(PayloadTooLarge):
        pixels_from_image_bytes(buffer.getvalue())  # the default budget refuses it too


def test_a_large_photo_within_budget_still_reads_as_its_digit(sample):
    """A 28x28 digit blown up to 3000x3000 (dark on white) comes back as the same digit shape."""
    digit = sample["x_test"][0]
    big = Image.fromarray(255 - digit).resize((3000, 3000), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    big.save(buffer, "PNG")
    pixels = pixels_from_image_bytes(buffer.getvalue())
    small = pixels_from_image_bytes(_png(255 - digit))
    assert np.abs(pixels.astype(int) - small.astype(int)).mean() < 20


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()
