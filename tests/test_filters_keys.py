"""Which paths are candidates, and the object keys they get."""

from __future__ import annotations

import pytest

from sidecar.config import DEFAULT_EXTENSIONS
from sidecar.errors import PermanentStoreError
from sidecar.filters import PathFilter
from sidecar.keys import KeyBuilder, check_key, path_text
from sidecar.mime import content_type

DEFAULT = PathFilter(DEFAULT_EXTENSIONS.split(","))


@pytest.mark.parametrize(
    ("relpath", "reason"),
    [
        ("ComfyUI_00001_.png", None),
        ("video/AnimateDiff_00001.MP4", None),
        ("%date:yyyy-MM-dd%/a b:c ü 😀.webp", None),
        (".tmpabc123", "hidden"),
        ("latents/.tmp_x.png", "hidden"),
        (".cache/a.png", "hidden"),
        ("a.png.part", "partial"),
        ("a.png.tmp", "partial"),
        ("checkpoints/model.safetensors", "extension"),
        ("noext", "extension"),
        ("ComfyUI_00001_.latent", None),  # SaveLatent: a default output type
        ("ComfyUI_00001_.json", "extension"),
    ],
)
def test_default_filter(relpath: str, reason: str | None) -> None:
    """ComfyUI outputs pass; dotfiles, temp files, partials and model files do not."""
    assert DEFAULT.skip_reason(relpath) == reason


def test_include_and_exclude_globs() -> None:
    """Include globs narrow the set, exclude globs remove from it."""
    f = PathFilter(["png"], include=["keep/*"], exclude=["*_preview.png"])
    assert f.skip_reason("keep/a.png") is None
    assert f.skip_reason("other/a.png") == "not_included"
    assert f.skip_reason("keep/a_preview.png") == "excluded"


def test_key_template_fields() -> None:
    """Every placeholder expands; the date is the file's mtime in UTC."""
    kb = KeyBuilder("{pod_id}/{date}/{relpath}|{filename}|{stem}|{ext}|{md5}", "pod-7")
    key = kb.key_for(b"sub/ComfyUI_00001_.png", mtime_ns=1_700_000_000 * 10**9, md5="ab" * 16)
    assert key == "pod-7/2023-11-14/sub/ComfyUI_00001_.png|ComfyUI_00001_.png|ComfyUI_00001_|png|" + "ab" * 16


def test_non_utf8_bytes_become_percent_escapes() -> None:
    """A name that is not valid UTF-8 still gives a valid UTF-8 key, deterministically."""
    assert path_text(b"a/\xff\xfeimg.png") == "a/%FF%FEimg.png"
    assert path_text("a/ü.png".encode()) == "a/ü.png"


def test_variant_key_keeps_the_extension() -> None:
    """The content-hash variant sits before the extension so the type stays obvious."""
    assert KeyBuilder.variant("p/ComfyUI_00001_.png", "0123456789abcdef" * 2) == "p/ComfyUI_00001_.0123456789ab.png"
    assert KeyBuilder.variant("p/noext", "0123456789abcdef" * 2) == "p/noext.0123456789ab"


def test_over_long_key_is_a_permanent_invalid_object_name() -> None:
    """A key over 1,024 bytes is rejected before any request, with a hint."""
    check_key("k" * 1024)
    with pytest.raises(PermanentStoreError) as info:
        check_key("é" * 513)
    assert info.value.code == "InvalidObjectName"
    assert "1024" in str(info.value) and info.value.hint


@pytest.mark.parametrize(
    ("name", "ctype"),
    [("a.png", "image/png"), ("a.WEBP", "image/webp"), ("a.mp4", "video/mp4"), ("a.glb", "model/gltf-binary"),
     ("a.opus", "audio/opus"), ("a.bin", "application/octet-stream"), ("noext", "application/octet-stream")],
)
def test_content_type_from_extension(name: str, ctype: str) -> None:
    """Content-Type follows the extension, including formats mimetypes does not know."""
    assert content_type(name) == ctype


def test_keys_are_injective_over_hostile_names() -> None:
    """No two distinct paths share a key: a literal '%XX' in a name, the control byte it spells, invalid
    UTF-8 and its surrogate spelling, every single byte value, and random mixes of them."""
    import random  # noqa: PLC0415

    names = {b"a%0A.png", b"a\n.png", b"a%25.png", b"a%.png", b"a%%.png", b"a%FF.png", b"a\xff.png",
             b"%2F.png", b"d%2Fe.png", b"x%7F.png", b"x\x7f.png", b"\xed\xb2\x80.png", b"\t.png", b"%09.png"}
    names |= {bytes([b]) + b".png" for b in range(256) if b not in (0x2F,)}
    rng = random.Random(1234)
    alphabet = [b"%", b"0", b"A", b"F", b"\n", b"\xff", b"\xc3\xa9", b"a", b"\x7f", b"2", b"5"]
    names |= {b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) + b".png" for _ in range(20_000)}
    builder = KeyBuilder("pod/{relpath}", "pod")
    keys = {builder.key_for(b"d/" + name, mtime_ns=0, md5="0" * 32) for name in names}
    assert len(keys) == len(names)
    assert path_text(b"a%0A.png") == "a%250A.png" and path_text(b"a\n.png") == "a%0A.png"


def test_a_raw_file_name_is_judged_as_its_text_is() -> None:
    """The scan's byte-level name check gives the same verdict as the text one, for ASCII and other names."""
    names = [b"a.png", b"A.PNG", b".hidden.png", b"x.png.part", b"x.PNG.TMP", b"backup~", b"noext", b"dot.",
             b"100%.png", b"ctl\x01.png", b"we.ird.WebP", b"pn\x01g", "caf\u00e9.png".encode(), "x.\u00c9XT".encode(),
             b"bad\xff.png", b"bad\xff.part", b".\xff", b"x.jpeg ", b"x. png"]
    for extensions in (DEFAULT_EXTENSIONS, ("png", ".WEBP", "\u00e9xt")):
        f = PathFilter(extensions)
        assert [f.raw_name_skip_reason(n) for n in names] == [f.name_skip_reason(path_text(n)) for n in names]
