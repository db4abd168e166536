"""Input parsing and image preprocessing, without a server."""

import base64
import io
import json

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFont

from service.inputs import InputError, parsed_json, pixels_from_image_bytes, pixels_from_json, pixels_from_json_body


def png(array: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


def test_one_image_or_a_list_of_images(sample):
    one = pixels_from_json(sample["x_test"][0].tolist(), 10)
    many = pixels_from_json(sample["x_test"][:3].tolist(), 10)
    channel = pixels_from_json(sample["x_test"][:2, ..., None].tolist(), 10)
    b64 = pixels_from_json({"b64": base64.b64encode(sample["x_test"][:4].tobytes()).decode()}, 10)
    assert one.shape == (1, 28, 28) and many.shape == (3, 28, 28) and channel.shape == (2, 28, 28)
    assert one.dtype == np.uint8
    np.testing.assert_array_equal(b64, sample["x_test"][:4])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.zeros((1, 56, 28)).tolist(), r"shape \[1, 56, 28\]"),
        ([], "empty list"),
        ("seven", "not str"),
        ([[0] * 28] * 27, r"shape \[27, 28\]"),
        ([[0] * 28] * 27 + [[0] * 27], "ragged"),
        ([[256] * 28] * 28, "0-255"),
        ([[-1] * 28] * 28, "0-255"),
        ([[0.5] * 28] * 28, "fractional"),
        ([[float("nan")] * 28] * 28, "NaN"),
        ([[float("inf")] * 28] * 28, "NaN or infinite"),
        ([[["a"] * 28] * 28], "numbers"),
        ([[True] * 28] * 28, "numbers"),
        (np.zeros((11, 28, 28), int).tolist(), "at most 10"),
        ({"b64": "@@@"}, "not valid base64"),
        ({"b64": base64.b64encode(b"123").decode()}, "multiple of 784"),
    ],
)
def test_bad_json_inputs_are_rejected_with_a_reason(value, message):
    with pytest.raises(InputError, match=message):
        pixels_from_json(value, max_images=10)


def test_too_many_images_are_refused_before_the_list_is_converted():
    """The count is checked on the parsed list itself: a body of thousands of images costs no
    conversion (the last image here would make the conversion fail as ragged)."""
    value = [[[0] * 28] * 28] * 10 + [[["not", "an", "image"]]]
    with pytest.raises(InputError, match="has 11 images; at most 10"):
        pixels_from_json(value, max_images=10)


def test_mnist_digit_written_as_dark_on_light_png_comes_back_as_itself(sample):
    for image in sample["x_test"][:20]:
        big = np.asarray(Image.fromarray(255 - image).resize((112, 112), Image.Resampling.BICUBIC))
        padded = np.pad(big, 40, constant_values=255)  # more paper around the digit
        restored = pixels_from_image_bytes(png(padded, "RGB")).astype(float)
        correlation = np.corrcoef(restored.ravel(), image.astype(float).ravel())[0, 1]
        assert correlation > 0.85


def test_light_on_dark_is_not_inverted(sample):
    image = sample["x_test"][5]
    restored = pixels_from_image_bytes(png(image)).astype(float)
    assert np.corrcoef(restored.ravel(), image.astype(float).ravel())[0, 1] > 0.85


def test_rendered_digit_is_scaled_to_20px_and_centred_by_mass():
    canvas = Image.new("RGB", (300, 200), "white")
    ImageDraw.Draw(canvas).text((200, 20), "7", fill=(30, 30, 30), font=ImageFont.load_default(size=150))
    pixels = pixels_from_image_bytes(png(np.asarray(canvas), "RGB"))
    ink = pixels > 64
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 in range(18, 22)
    ys, xs = np.indices(pixels.shape)
    mass = pixels.astype(float)
    assert abs((ys * mass).sum() / mass.sum() - 14) < 1.5 and abs((xs * mass).sum() / mass.sum() - 14) < 1.5
    assert pixels[0].max() == 0 and pixels[:, 0].max() == 0  # dark background, as MNIST


@pytest.mark.parametrize(
    ("data", "message"), [(b"", "empty"), (b"not an image", "cannot decode"), (png(np.full((30, 30), 255, np.uint8)), "no digit")]
)
def test_bad_uploads(data, message):
    with pytest.raises(InputError, match=message):
        pixels_from_image_bytes(data)


def _either(parse):
    try:
        return parse()
    except InputError as exc:
        return f"InputError: {exc}"


def _assert_body_parses_as_json_would(body: bytes, max_images: int = 10) -> None:
    """The body route (plain integers read straight from the bytes) answers exactly what parsing the
    JSON and validating the lists answers: the same pixels, or the same error message."""
    direct = _either(lambda: pixels_from_json_body(body, max_images, "request body"))
    general = _either(lambda: pixels_from_json(parsed_json(body), max_images, "request body"))
    if isinstance(general, str):
        assert direct == general
    else:
        assert isinstance(direct, np.ndarray) and direct.dtype == np.uint8, direct
        np.testing.assert_array_equal(direct, general)


def _one_image_body(sample) -> bytes:
    return orjson.dumps(sample["x_test"][0].tolist())


@pytest.mark.parametrize(
    "edit",
    [
        lambda body: body,
        lambda body: body.replace(b",", b", "),  # json.dumps's separators
        lambda body: b" \n" + body.replace(b"],", b"],\n  ") + b"\n",  # pretty-printed
        lambda body: body.replace(b"0,0", b"0 0,", 1),  # two numbers in one field
        lambda body: body.replace(b",0,", b",007,", 1),  # a leading zero is not JSON
        lambda body: body.replace(b",0,", b",,", 1),  # an empty field
        lambda body: body.replace(b",0,", b",256,", 1),
        lambda body: body.replace(b",0,", b",-1,", 1),
        lambda body: body.replace(b",0,", b",1.0,", 1),  # an integral float: accepted, as before
        lambda body: body.replace(b",0,", b",1.5,", 1),
        lambda body: body.replace(b",0,", b",99999999999999999999999,", 1),
        lambda body: body.replace(b",0,", b",true,", 1),
        lambda body: body + b"x",
        lambda body: body[:-1],
        lambda body: body.replace(b"],[", b",", 1),  # a row too long and one too few
        lambda body: b"[" + b",".join([body] * 3) + b"]",  # three images
        lambda body: b"[" + b",".join([body] * 11) + b"]",  # over the request's image limit
        lambda body: b"[" + body + b",[]]",
        lambda body: b"[]",
    ],
)
def test_a_json_body_gives_what_the_json_parser_and_validation_give(sample, edit):
    _assert_body_parses_as_json_would(edit(_one_image_body(sample)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    images=st.integers(0, 3),
    value=st.integers(-3, 300),
    position=st.integers(0, 3 * 784 - 1),
    spaced=st.booleans(),
)
def test_any_small_integer_body_gives_what_the_json_parser_gives(sample, images, value, position, spaced):
    pixels = sample["x_test"][: max(images, 1)].astype(np.int64)
    pixels.flat[position % pixels.size] = value
    body = json.dumps(pixels[0].tolist() if images == 0 else pixels.tolist(), separators=(", ", ": ") if spaced else (",", ":"))
    _assert_body_parses_as_json_would(body.encode())
