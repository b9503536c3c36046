"""The S3/R2 store and the per-file transfer, over HTTPS through the R2-strict proxy to a real moto server."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from support.proxy import R2Proxy
from support.s3server import S3Server

from sidecar.config import load_settings
from sidecar.errors import KeyExistsError, PermanentStoreError, TransientStoreError
from sidecar.filebody import FileSlice
from sidecar.journal import FileRow
from sidecar.keys import KeyBuilder
from sidecar.parts import PartBudget
from sidecar.routing import Router
from sidecar.store import ObjectHeaders, composite_etag
from sidecar.store_s3 import S3Store, make_client
from sidecar.transfer import IN_MEMORY_MAX, MAX_PARTS, MIB, Transfer, part_size_for

T = TypeVar("T")


def make_store(proxy: R2Proxy, bucket: str, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> S3Store:
    if proxy.ca_bundle:
        monkeypatch.setenv("AWS_CA_BUNDLE", proxy.ca_bundle)
    settings = load_settings(bucket=bucket, endpoint_url=proxy.endpoint, region="us-east-1",
                             access_key_id="testing", secret_access_key="testing", read_timeout_s=5, **kw)
    return S3Store(make_client(settings), bucket, secrets=["testing"])


def once(fn: Callable[[], T]) -> T:
    return fn()


def row(path: bytes, **kw: Any) -> FileRow:
    base: dict[str, Any] = dict(id=1, path=path, size=0, mtime_ns=0, state="uploading", source="close", attempts=0,
                                discovered_at=0.0, md5=None, key=None, etag=None, upload_id=None)
    base.update(kw)
    return FileRow(**base)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def store(r2_proxy: R2Proxy, bucket: str, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    return make_store(r2_proxy, bucket, monkeypatch)


class Ledger:
    """Records what the transfer writes down about multipart uploads (the journal's role)."""

    def __init__(self) -> None:
        self.open: dict[int, tuple[str | None, str | None]] = {}
        self.orphans: list[tuple[str, str]] = []

    def set_upload(self, row_id: int, key: str | None, upload_id: str | None) -> None:
        self.open[row_id] = (key, upload_id)

    def add_orphan(self, key: str, upload_id: str) -> None:
        self.orphans.append((key, upload_id))


def make_transfer(store: S3Store, root: Path, threshold: int = 64 * MIB, part: int = 5 * MIB, *,
                  template: str = "pod/{relpath}", ledger: Ledger | None = None,
                  budget: PartBudget | None = None) -> Transfer:
    return Transfer(store, root, Router.plain(KeyBuilder(template, "pod")), multipart_threshold=threshold,
                    part_size=part, retry=once, ledger=ledger or Ledger(), budget=budget)


def test_put_is_one_r2_acceptable_request(store: S3Store, r2_proxy: R2Proxy, s3_server: S3Server, bucket: str) -> None:
    """A PUT passes R2's strict checks in exactly one request, with Content-MD5 and no checksum trailer."""
    data = b"png-bytes" * 100
    etag = store.put("k/a.png", data, md5_hex=md5(data), headers=ObjectHeaders("image/png"))
    assert etag == md5(data)
    (put,) = r2_proxy.requests
    assert put.method == "PUT" and put.status == 200
    assert "content-md5" in put.headers and "x-amz-trailer" not in put.headers
    assert put.headers.get("if-none-match") == "*"
    # The signature covers Content-MD5, not a second hash of the body (the form botocore uses over https)
    assert put.headers.get("x-amz-content-sha256") == "UNSIGNED-PAYLOAD"
    assert s3_server.objects(bucket) == {"k/a.png": data}
    assert s3_server.head(bucket, "k/a.png")["ContentType"] == "image/png"


def test_put_never_overwrites(store: S3Store) -> None:
    """A second PUT to a taken key raises KeyExistsError instead of replacing the object."""
    store.put("k", b"one", md5_hex=md5(b"one"), headers=ObjectHeaders("image/png"))
    with pytest.raises(KeyExistsError):
        store.put("k", b"two", md5_hex=md5(b"two"), headers=ObjectHeaders("image/png"))


def test_head_reports_the_stores_md5(store: S3Store, s3_server: S3Server, bucket: str) -> None:
    """HEAD tells the content MD5 of an object -- the store's own single-part ETag, never metadata that
    claims otherwise -- or None for a missing key."""
    store.put("k", b"one", md5_hex=md5(b"one"), headers=ObjectHeaders("image/png"))
    info = store.head("k")
    assert info is not None and info.md5 == md5(b"one") and info.size == 3
    s3_server.direct.put_object(Bucket=bucket, Key="forged", Body=b"two", Metadata={"md5": md5(b"one")})
    forged = store.head("forged")
    assert forged is not None and forged.md5 == md5(b"two")
    assert store.head("missing") is None


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [(503, "SlowDown", TransientStoreError), (500, "InternalError", TransientStoreError),
     (429, "TooManyRequests", TransientStoreError), (403, "AccessDenied", PermanentStoreError),
     (501, "NotImplemented", PermanentStoreError)],
)
def test_errors_are_classified(store: S3Store, r2_proxy: R2Proxy, status: int, code: str, kind: type) -> None:
    """5xx and 429 are transient; 403 and 501 are permanent, with a hint for the operator."""
    r2_proxy.fail_all(status=status, code=code)
    with pytest.raises(kind) as info:
        store.put("k", b"x", md5_hex=md5(b"x"), headers=ObjectHeaders("image/png"))
    assert info.value.code == code and "PutObject" in str(info.value)
    if kind is PermanentStoreError:
        assert info.value.hint


def test_missing_bucket_and_unreachable_store(r2_proxy: R2Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing bucket is permanent with a hint naming SIDECAR_BUCKET; a refused connection is transient."""
    store = make_store(r2_proxy, "no-such-bucket-here", monkeypatch)
    with pytest.raises(PermanentStoreError) as info:
        store.check()
    assert info.value.code == "NoSuchBucket" and "SIDECAR_BUCKET" in str(info.value)
    r2_proxy.down()
    with pytest.raises(TransientStoreError) as down:
        store.put("k", b"x", md5_hex=md5(b"x"), headers=ObjectHeaders("image/png"))
    assert down.value.code == "ConnectionError"


def test_transfer_reused_name_goes_to_a_variant(store: S3Store, r2_proxy: R2Proxy, s3_server: S3Server,
                                                bucket: str, tmp_path: Path) -> None:
    """New bytes under an uploaded name go straight to the content-hash variant: one PUT, both kept."""
    transfer = make_transfer(store, tmp_path)
    (tmp_path / "a.png").write_bytes(b"first")
    first = transfer.run(row(b"a.png"))
    (tmp_path / "a.png").write_bytes(b"second")
    second = transfer.run(row(b"a.png", md5=first.md5, key=first.key, etag=first.etag))
    assert second.key == KeyBuilder.variant("pod/a.png", md5(b"second"))
    assert s3_server.objects(bucket) == {"pod/a.png": b"first", second.key: b"second"}
    assert len(r2_proxy.puts()) == 2 and r2_proxy.heads() == []


def test_transfer_unchanged_content_sends_nothing(store: S3Store, r2_proxy: R2Proxy, tmp_path: Path) -> None:
    """A rewrite with identical bytes is recognised from the journal and costs zero requests."""
    transfer = make_transfer(store, tmp_path)
    (tmp_path / "a.png").write_bytes(b"same")
    first = transfer.run(row(b"a.png"))
    r2_proxy.clear()
    again = transfer.run(row(b"a.png", md5=first.md5, key=first.key, etag=first.etag))
    assert again.outcome == "unchanged" and r2_proxy.requests == []


def test_transfer_after_lost_journal_does_not_duplicate(store: S3Store, r2_proxy: R2Proxy, s3_server: S3Server,
                                                        bucket: str, tmp_path: Path) -> None:
    """If the object is already there with our bytes (crash after PUT), a 412 and a HEAD settle it."""
    s3_server.direct.put_object(Bucket=bucket, Key="pod/a.png", Body=b"ours")
    (tmp_path / "a.png").write_bytes(b"ours")
    result = make_transfer(store, tmp_path).run(row(b"a.png"))
    assert result.outcome == "existing" and result.key == "pod/a.png"
    assert [r.operation for r in r2_proxy.requests] == ["PutObject", "HeadObject"]


@pytest.mark.parametrize("forged", [False, True], ids=["plain", "metadata-claims-our-md5"])
def test_transfer_foreign_object_is_not_overwritten(store: S3Store, s3_server: S3Server, bucket: str,
                                                    tmp_path: Path, forged: bool) -> None:
    """Someone else's bytes under our key stay; ours go to the variant key -- even when the foreign object's
    metadata names our MD5 (the store's ETag is believed)."""
    meta = {"md5": md5(b"ours")} if forged else {}
    s3_server.direct.put_object(Bucket=bucket, Key="pod/a.png", Body=b"theirs", Metadata=meta)
    (tmp_path / "a.png").write_bytes(b"ours")
    result = make_transfer(store, tmp_path).run(row(b"a.png"))
    assert result.variant_of == "pod/a.png"
    assert s3_server.objects(bucket) == {"pod/a.png": b"theirs", result.key: b"ours"}


def test_variant_key_is_tried_once(store: S3Store, r2_proxy: R2Proxy, s3_server: S3Server, bucket: str,
                                   tmp_path: Path) -> None:
    """Key and variant both hold other bytes: parked as KeyConflict after exactly PUT, HEAD, PUT, HEAD."""
    (tmp_path / "a.png").write_bytes(b"ours")
    variant = KeyBuilder.variant("pod/a.png", md5(b"ours"))
    for key in ("pod/a.png", variant):
        s3_server.direct.put_object(Bucket=bucket, Key=key, Body=b"theirs")
    with pytest.raises(PermanentStoreError) as err:
        make_transfer(store, tmp_path).run(row(b"a.png"))
    assert err.value.code == "KeyConflict"
    assert [(r.operation, r.key) for r in r2_proxy.requests] == [
        ("PutObject", "pod/a.png"), ("HeadObject", "pod/a.png"), ("PutObject", variant), ("HeadObject", variant)]
    # known new content under an uploaded name starts at the variant: one PUT and one HEAD, not two of each
    r2_proxy.clear()
    with pytest.raises(PermanentStoreError):
        make_transfer(store, tmp_path).run(row(b"a.png", md5=md5(b"old"), key="pod/a.png", etag=md5(b"old")))
    assert [(r.operation, r.key) for r in r2_proxy.requests] == [("PutObject", variant), ("HeadObject", variant)]


@pytest.mark.parametrize("forward", [False, True], ids=["store-kept-nothing", "store-kept-it"])
def test_an_answer_without_etag_is_not_an_upload(store: S3Store, r2_proxy: R2Proxy, s3_server: S3Server,
                                                 bucket: str, forward: bool) -> None:
    """200 without an ETag proves nothing: a transient ETagMissing, whether or not the store kept the bytes;
    the retry then settles it (a new PUT, or a 412 and a HEAD that shows our MD5)."""
    r2_proxy.answer_without_etag(1, forward=forward)
    with pytest.raises(TransientStoreError) as err:
        store.put("k", b"one", md5_hex=md5(b"one"), headers=ObjectHeaders("image/png"))
    assert err.value.code == "ETagMissing"
    assert s3_server.objects(bucket) == ({"k": b"one"} if forward else {})


def test_multipart_completion_is_conditional(store: S3Store, r2_proxy: R2Proxy, s3_server: S3Server, bucket: str,
                                             tmp_path: Path) -> None:
    """Two big files mapped to one key (a template without {relpath}): the first completes, the second's
    CompleteMultipartUpload answers 412 and it goes to its variant; no HEAD comes before a multipart upload,
    every completion carries If-None-Match, and neither object is overwritten."""
    first, second = os.urandom(6 * MIB), os.urandom(6 * MIB)
    for folder, data in (("a", first), ("b", second)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.mp4").write_bytes(data)
    ledger = Ledger()
    transfer = make_transfer(store, tmp_path, threshold=5 * MIB, template="{pod_id}/{filename}", ledger=ledger)
    one = transfer.run(row(b"a/x.mp4"))
    assert r2_proxy.requests[0].operation == "CreateMultipartUpload" and r2_proxy.heads() == []
    two = transfer.run(row(b"b/x.mp4", id=2))
    variant = KeyBuilder.variant("pod/x.mp4", md5(second))
    assert (one.key, two.variant_of, two.key) == ("pod/x.mp4", "pod/x.mp4", variant)
    assert s3_server.objects(bucket) == {"pod/x.mp4": first, two.key: second}
    completes = r2_proxy.select(operation="CompleteMultipartUpload")
    assert [c.status for c in completes] == [200, 412, 200]
    assert all(c.headers.get("if-none-match") == "*" for c in completes)
    assert s3_server.direct.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # the loser aborted
    assert ledger.orphans == [] and set(ledger.open.values()) == {(None, None)}


def test_multipart_of_our_own_bytes_after_a_lost_journal_is_recognised(
        store: S3Store, r2_proxy: R2Proxy, s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    """A multipart object that is already ours (its composite ETag matches our parts) is 'existing'."""
    data = os.urandom(6 * MIB)
    (tmp_path / "x.mp4").write_bytes(data)
    make_transfer(store, tmp_path, threshold=5 * MIB).run(row(b"x.mp4"))
    again = make_transfer(store, tmp_path, threshold=5 * MIB).run(row(b"x.mp4"))
    assert again.outcome == "existing" and s3_server.objects(bucket) == {"pod/x.mp4": data}


def test_failed_abort_keeps_the_upload_id(store: S3Store, r2_proxy: R2Proxy, s3_server: S3Server, bucket: str,
                                          tmp_path: Path) -> None:
    """A part fails, then the abort fails too: the upload id goes to the ledger's orphans, not forgotten."""
    (tmp_path / "x.mp4").write_bytes(os.urandom(11 * MIB))
    r2_proxy.fail_all(status=500, code="InternalError",
                      when=lambda r: r.part_number == 2 or r.operation == "AbortMultipartUpload")
    ledger = Ledger()
    with pytest.raises(TransientStoreError):
        make_transfer(store, tmp_path, threshold=5 * MIB, ledger=ledger).run(row(b"x.mp4"))
    (open_upload,) = s3_server.direct.list_multipart_uploads(Bucket=bucket)["Uploads"]
    assert ledger.orphans == [("pod/x.mp4", open_upload["UploadId"])]


def test_multipart_uses_equal_parts_and_round_trips(store: S3Store, r2_proxy: R2Proxy, s3_server: S3Server,
                                                    bucket: str, tmp_path: Path) -> None:
    """Above the threshold: equal parts (R2 rejects unequal ones), each with Content-MD5; bytes identical."""
    data = os.urandom(5 * MIB * 2 + 12345)
    (tmp_path / "big.mp4").write_bytes(data)
    result = make_transfer(store, tmp_path, threshold=5 * MIB).run(row(b"big.mp4"))
    assert s3_server.objects(bucket)[result.key] == data
    parts = r2_proxy.parts()
    assert [p.payload_len for p in parts] == [5 * MIB, 5 * MIB, 12345]
    assert all("content-md5" in p.headers for p in parts)
    assert result.md5 == md5(data)  # the whole-file MD5 from the same pass that sent the parts
    info = store.head(result.key)
    part_md5s = [md5(data[i:i + 5 * MIB]) for i in range(0, len(data), 5 * MIB)]
    assert info is not None and info.etag == composite_etag(part_md5s) and info.claimed_md5 is None


def test_multipart_sends_parts_in_parallel_while_hashing(store: S3Store, r2_proxy: R2Proxy, s3_server: S3Server,
                                                         bucket: str, tmp_path: Path) -> None:
    """Parts overlap in flight (the proxy sees as many at once as there are senders, never more)."""
    data = os.urandom(5 * MIB * 6)
    (tmp_path / "big.mp4").write_bytes(data)
    r2_proxy.delay(0.3, when=lambda r: r.operation == "UploadPart")
    budget = PartBudget(buffers=4, senders=3)
    result = make_transfer(store, tmp_path, threshold=5 * MIB, budget=budget).run(row(b"big.mp4"))
    assert s3_server.objects(bucket)[result.key] == data and result.md5 == md5(data)
    spans = [(r.started, r.started + (r.duration or 0)) for r in r2_proxy.parts()]
    assert len(spans) == 6
    overlap = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert overlap == 3


def test_part_size_keeps_under_ten_thousand_parts() -> None:
    """Part size grows in whole MiB so no file needs more than 10,000 parts."""
    assert part_size_for(100 * MIB, 16 * MIB) == 16 * MIB
    for size in (200 * 1024**3, 4 * 1024**4, 5 * 1024**4 - 1):
        part = part_size_for(size, 16 * MIB)
        assert part % MIB == 0 and -(-size // part) <= MAX_PARTS


@pytest.mark.parametrize("name", ["a b/c%d:e+f=g&h@i,j;k$.png", "émoji 😀/%date:yyyy-MM-dd%/x.png", "t~u!v'w(x)*.png"])
def test_put_signature_is_valid_for_odd_keys(store: S3Store, r2_proxy: R2Proxy, s3_server: S3Server,
                                             bucket: str, name: str) -> None:
    """Keys with spaces, %, :, +, & and emoji are signed so that a SigV4 verifier accepts them."""
    store.put(name, b"odd", md5_hex=md5(b"odd"), headers=ObjectHeaders("image/png"))
    assert s3_server.objects(bucket) == {name: b"odd"}
    (put,) = r2_proxy.puts()
    assert put.headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"  # https + Content-MD5, as boto3 does


def test_wrong_secret_is_refused_and_never_shown(r2_proxy: R2Proxy, bucket: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy's SigV4 check refuses a wrong secret on PUT and HEAD; the error is bucket-scoped and secret-free."""
    monkeypatch.setenv("AWS_CA_BUNDLE", str(r2_proxy.ca_bundle))
    settings = load_settings(bucket=bucket, endpoint_url=r2_proxy.endpoint, region="us-east-1",
                             access_key_id="testing", secret_access_key="not-the-secret")
    store = S3Store(make_client(settings), bucket, secrets=["not-the-secret"])
    with pytest.raises(PermanentStoreError) as lean:
        store.put("k", b"x", md5_hex=md5(b"x"), headers=ObjectHeaders("image/png"))
    with pytest.raises(PermanentStoreError) as boto:
        store.head("k")
    assert lean.value.code == "SignatureDoesNotMatch" and lean.value.scope == "bucket"
    assert boto.value.code in ("SignatureDoesNotMatch", "AccessDenied")
    assert "not-the-secret" not in str(lean.value) + str(boto.value)


def test_a_version_other_than_the_confirmed_one_is_never_sent(store: S3Store, r2_proxy: R2Proxy,
                                                               tmp_path: Path) -> None:
    """The writer check confirmed one version; by the time a worker opens the file a writer has truncated it
    and begun again (the demo caught a 0-byte object so). The transfer refuses it -- FileChanged, no request --
    and the version recorded next is sent whole."""
    from sidecar.transfer import FileChanged  # noqa: PLC0415

    path = tmp_path / "a.png"
    path.write_bytes(b"x" * 4000)
    st = path.stat()
    confirmed = row(b"a.png", size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino, ctime_ns=st.st_ctime_ns)
    with path.open("r+b") as writer:  # in place: same inode, truncated, half rewritten
        writer.truncate(0)
        writer.write(b"y" * 100)
        writer.flush()
        with pytest.raises(FileChanged):
            make_transfer(store, tmp_path).run(confirmed)
    assert r2_proxy.requests == []
    st = path.stat()
    again = make_transfer(store, tmp_path).run(
        row(b"a.png", size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino, ctime_ns=st.st_ctime_ns))
    assert again.outcome == "uploaded" and again.size == 100


def test_large_single_put_streams_from_the_file(store: S3Store, r2_proxy: R2Proxy, s3_server: S3Server,
                                                bucket: str, tmp_path: Path) -> None:
    """Above the in-memory size a single PUT is sent from the descriptor: one request, exact bytes."""
    data = os.urandom(IN_MEMORY_MAX + 3 * MIB + 7)
    (tmp_path / "clip.mp4").write_bytes(data)
    result = make_transfer(store, tmp_path).run(row(b"clip.mp4"))
    assert s3_server.objects(bucket)[result.key] == data and result.md5 == md5(data)
    (put,) = r2_proxy.requests
    assert put.operation == "PutObject" and put.payload_len == len(data) and "content-md5" in put.headers


def test_file_slice_never_sends_more_than_was_hashed(tmp_path: Path) -> None:
    """A file that grows after hashing still yields exactly the hashed length; seeks behave like a file."""
    path = tmp_path / "grow.bin"
    path.write_bytes(b"0123456789")
    with path.open("rb") as f:
        body = FileSlice(f.fileno(), 6)
        with path.open("ab") as w:
            w.write(b"more")
        assert len(body) == 6 and body.read(4) == b"0123" and body.read() == b"45" and body.read() == b""
        assert body.seek(0, 2) == 6 and body.tell() == 6 and body.seek(1) == 1 and body.read(100) == b"12345"


def test_a_completion_answered_with_the_whole_objects_md5_is_proof_and_another_etag_is_not(
        store: S3Store, r2_proxy: R2Proxy, s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    """Some S3-compatible servers (localbucket) answer CompleteMultipartUpload with the MD5 of the whole
    object, not S3's composite: that proves the bytes, so it is accepted at once -- no abort, no HEAD, no
    second completion. Any other ETag is still refused (ETagMismatch)."""
    data = os.urandom(6 * MIB)
    (tmp_path / "x.mp4").write_bytes(data)
    completing = lambda r: r.operation == "CompleteMultipartUpload"  # noqa: E731
    r2_proxy.answer_with_etag(md5(data), 1, when=completing)
    done = make_transfer(store, tmp_path, threshold=5 * MIB).run(row(b"x.mp4"))
    assert (done.outcome, done.etag) == ("uploaded", md5(data))
    assert [r.operation for r in r2_proxy.requests if r.operation != "UploadPart"] == [
        "CreateMultipartUpload", "CompleteMultipartUpload"]
    assert s3_server.objects(bucket) == {"pod/x.mp4": data}
    (tmp_path / "y.mp4").write_bytes(os.urandom(6 * MIB))
    r2_proxy.answer_with_etag("0" * 32, 1, when=completing)
    with pytest.raises(TransientStoreError) as refused:
        make_transfer(store, tmp_path, threshold=5 * MIB).run(row(b"y.mp4", id=2))
    assert refused.value.code == "ETagMismatch"
