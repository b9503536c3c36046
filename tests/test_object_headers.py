"""Objects stored the way users configure them elsewhere: Cache-Control, Content-Disposition, storage class,
static metadata and per-path routes, on single PUTs and multipart uploads, through the R2-strict proxy.
Every header is read back with a HEAD on the server itself, never from the daemon."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from botocore.exceptions import ClientError
from support.e2e import World
from support.proxy import R2Proxy
from support.s3server import S3Server
from support.waiting import wait_until

from sidecar.config import Settings
from sidecar.errors import PermanentStoreError
from sidecar.keys import KeyBuilder, escape_unsafe
from sidecar.routing import Router

IMMUTABLE = "public, max-age=31536000, immutable"
MIB = 1024 * 1024


def head(world: World, key: str) -> dict[str, object]:
    info = world.s3.head(world.bucket, key)
    assert info is not None, key
    return info


@pytest.mark.slow
def test_headers_metadata_and_storage_class_on_single_and_multipart_objects(world: World) -> None:
    files = {"a.png": os.urandom(1000), "big.mp4": os.urandom(6 * MIB), "logo.svg": b"<svg/>" * 10}
    proc = world.start(cache_control=IMMUTABLE, metadata="tenant=acme,project=p1", storage_class="STANDARD_IA",
                       multipart_threshold_mb=5, part_size_mb=5)
    for rel, data in files.items():
        world.path(world.remember(rel, data)).write_bytes(data)
    world.wait_in_bucket(list(files), proc, timeout=60)
    assert world.bucket_diff(world.expected()) == []
    assert [r.operation for r in world.proxy.requests if r.key == world.key("big.mp4")][:1] == [
        "CreateMultipartUpload"]
    for rel, data in files.items():
        info = head(world, world.key(rel))
        assert info["CacheControl"] == IMMUTABLE, rel
        # A multipart object is hashed while its parts are sent: its MD5 is in the journal, not the metadata.
        own = {} if rel == "big.mp4" else {"md5": hashlib.md5(data).hexdigest()}
        assert info["Metadata"] == {**own, "tenant": "acme", "project": "p1"}, rel
        assert info.get("StorageClass") == "STANDARD_IA", rel
    assert head(world, world.key("logo.svg"))["ContentDisposition"] == "attachment"  # SVG can carry script
    assert head(world, world.key("logo.svg"))["ContentType"] == "image/svg+xml"
    assert "ContentDisposition" not in head(world, world.key("a.png"))
    assert "ContentDisposition" not in head(world, world.key("big.mp4"))


def test_defaults_send_no_extra_header(world: World) -> None:
    """Without settings: no Cache-Control, no storage class header at all (R2 answers an empty one 501)."""
    proc = world.start()
    world.path(world.remember("a.png", b"png")).write_bytes(b"png")
    world.wait_in_bucket(["a.png"], proc)
    (put,) = world.proxy.puts()
    assert "x-amz-storage-class" not in put.headers and "cache-control" not in put.headers
    info = head(world, world.key("a.png"))
    assert "CacheControl" not in info and info["Metadata"] == {"md5": hashlib.md5(b"png").hexdigest()}


def test_routes_pick_template_and_headers_by_path_first_match_wins(world: World) -> None:
    routes = [
        {"match": "video/*", "key_template": "{pod_id}/videos/{relpath}", "cache_control": IMMUTABLE,
         "metadata": {"kind": "video"}},
        {"match": "video/raw/*", "cache_control": "no-store"},  # never reached: the first rule matches first
        {"match": "*.svg", "content_disposition": "inline"},
    ]
    proc = world.start(routes=json.dumps(routes), metadata="tenant=acme")
    for rel in ("video/clip.mp4", "video/raw/take.mp4", "img/a.png", "img/b.svg"):
        world.path(rel).parent.mkdir(parents=True, exist_ok=True)
        world.path(world.remember(rel, os.urandom(500))).write_bytes(world.written[rel])
    keys = {"video/clip.mp4": "pod-e2e/videos/video/clip.mp4",
            "video/raw/take.mp4": "pod-e2e/videos/video/raw/take.mp4",
            "img/a.png": world.key("img/a.png"), "img/b.svg": world.key("img/b.svg")}
    wait_until(lambda: set(keys.values()) <= world.bucket_keys(), timeout=30, message=proc.output)
    for rel in ("video/clip.mp4", "video/raw/take.mp4"):
        info = head(world, keys[rel])
        assert info["CacheControl"] == IMMUTABLE and info["Metadata"]["kind"] == "video"  # type: ignore[index]
        assert info["Metadata"]["tenant"] == "acme"  # type: ignore[index]
    assert "CacheControl" not in head(world, keys["img/a.png"])
    assert head(world, keys["img/b.svg"])["ContentDisposition"] == "inline"
    objects = world.objects()
    assert all(objects[keys[rel]] == world.written[rel] for rel in keys)


def test_the_strict_proxy_rejects_what_r2_rejects(r2_proxy: R2Proxy, s3_server: S3Server, bucket: str) -> None:
    client = r2_proxy.client()

    def code(**extra: object) -> str:
        try:
            client.put_object(Bucket=bucket, Key="k", Body=b"x", IfNoneMatch="*", **extra)  # type: ignore[arg-type]
        except ClientError as exc:
            return str(exc.response["Error"]["Code"])
        return "ok"

    assert code(Metadata={"big": "v" * 8200}) == "MetadataTooLarge"
    assert code(StorageClass="GLACIER") == "InvalidStorageClass"
    assert code(Tagging="a=b") == "NotImplemented"
    assert code(StorageClass="STANDARD_IA", Metadata={"small": "v"}) == "ok"


def test_unsafe_characters_can_be_escaped_in_keys() -> None:
    """SIDECAR_KEY_ESCAPE=unsafe: backslashes and bidi overrides become %XX; other text is unchanged."""
    name = "evil\u202egnp.exe\\x.png".encode()
    plain = KeyBuilder("{relpath}", "p").key_for(name, mtime_ns=0, md5="0" * 32)
    escaped = KeyBuilder("{relpath}", "p", escape_unsafe=True).key_for(name, mtime_ns=0, md5="0" * 32)
    assert plain == "evil\u202egnp.exe\\x.png"
    assert escaped == "evil%E2%80%AEgnp.exe%5Cx.png"
    assert escape_unsafe("día/ñ.png") == "día/ñ.png"


def test_a_template_that_leaves_a_segment_empty_fails_the_file_not_the_daemon() -> None:
    with pytest.raises(PermanentStoreError, match=r"empty, '\.' or '\.\.' segment") as caught:
        KeyBuilder("{pod_id}/{ext}/{stem}", "p").key_for(b"README", mtime_ns=0, md5="0" * 32)
    assert caught.value.code == "InvalidObjectName"


def test_route_sets_that_could_share_a_key_are_flagged() -> None:
    """A template without {relpath} or {md5}, or two templates with overlapping literal heads, is flagged;
    the default alone, or routes whose templates cannot overlap, are not."""
    base = {"bucket": "b", "endpoint_url": "http://127.0.0.1:9"}
    assert Router.from_settings(Settings(**base)).warnings() == []  # type: ignore[arg-type]
    apart = [{"match": "video/*", "key_template": "videos/{relpath}"}]
    separate = Settings(**base, key_template="images/{relpath}", routes=apart)  # type: ignore[arg-type]
    assert Router.from_settings(separate).warnings() == []
    flat = [{"match": "video/*", "key_template": "{pod_id}/{filename}"}]
    warnings = Router.from_settings(Settings(**base, routes=flat)).warnings()  # type: ignore[arg-type]
    assert any("neither {relpath} nor {md5}" in w for w in warnings), warnings
    nested = [{"match": "video/*", "key_template": "{pod_id}/v/{relpath}"}]
    (warning,) = Router.from_settings(Settings(**base, routes=nested)).warnings()  # type: ignore[arg-type]
    assert "start alike" in warning


def test_the_daemon_logs_a_possible_key_collision_at_start(world: World) -> None:
    proc = world.start(routes=json.dumps([{"match": "video/*", "key_template": "{pod_id}/{filename}"}]))
    lines = proc.events("key_routes_may_collide")
    assert lines and all(line["level"] == "warning" for line in lines)
    assert any("neither {relpath} nor {md5}" in line["problem"] for line in lines)
