"""singer.storage (the S3 client, transfers and the local SeaweedFS server) against a real server (the
`s3_server` fixture)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from singer import storage
from singer.storage import (
    GRPC_OFFSET,
    StorageError,
    free_ports,
    parse_s3_uri,
    read_state,
    server_status,
    start_server,
    stop_server,
    transfer,
)

MiB = 1024 * 1024
SMALL_PART = 5 * MiB  # the smallest part size S3 (and boto3) allow


def make_tree(root: Path) -> dict[str, bytes]:
    """A few files in sub-folders, one big enough for a 3-part upload at SMALL_PART."""
    rng = __import__("random").Random(0)
    files = {
        "a.txt": b"hello singer\n",
        "s1/take1.mp4": bytes(rng.getrandbits(8) for _ in range(3000)),
        "s1/deep/notes.json": b'{"x": 1}',
        "s2/big.bin": os.urandom(2 * SMALL_PART + 12345),
        "s2/empty.wav": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def tree_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------- URIs


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://singer/dvcstore", ("singer", "dvcstore")),
        ("s3://singer", ("singer", "")),
        ("s3://singer/", ("singer", "")),
        ("s3://singer/raw/s1/", ("singer", "raw/s1/")),
        ("S3://singer/a b/c.mp4", ("singer", "a b/c.mp4")),
        ("  s3://my.bucket-1/x  ", ("my.bucket-1", "x")),
        ("s3://abc//x", ("abc", "/x")),
    ],
)
def test_parse_s3_uri(uri, expected):
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "singer/raw",
        "http://singer/raw",
        "s3:/singer",
        "s3://",
        "s3:///raw",
        "s3://Upper/x",
        "s3://ab/x",
        "s3://under_score/x",
        "s3://-dash/x",
        "s3://a..b/x",
        "/local/path",
        None,
    ],
)
def test_parse_s3_uri_rejects(uri):
    with pytest.raises((ValueError, TypeError)):
        parse_s3_uri(uri)


def test_multipart_etag_matches_s3_formula(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 11)
    assert storage.multipart_etag(path, 4).endswith("-3")
    assert storage.verify_file(path, 11, storage.file_md5(path)) is True
    assert storage.verify_file(path, 12, storage.file_md5(path)) is False
    assert storage.verify_file(path, 11, storage.multipart_etag(path, 4), part_sizes=[4]) is True
    assert storage.verify_file(path, 11, "0" * 32 + "-3") is None  # size only: cannot tell
    assert storage.verify_file(path, 11, "0" * 32 + "-3", sha256=storage.file_sha256(path)) is True


# ---------------------------------------------------------------------------------------- transfers


def test_round_trip_with_multipart(s3_env, s3_bucket, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = make_tree(src)
    etags = storage.upload_dir(
        src, f"s3://{s3_bucket}/raw", multipart_threshold=SMALL_PART, multipart_chunksize=SMALL_PART
    )
    assert set(etags) == {f"raw/{k}" for k in files}
    assert etags["raw/s2/big.bin"].endswith("-3"), "the big file went up in 3 parts"
    assert "-" not in etags["raw/a.txt"]

    listed = storage.list_objects(f"s3://{s3_bucket}/raw")
    assert [o["key"] for o in listed] == sorted(f"raw/{k}" for k in files)
    assert {o["key"]: o["size"] for o in listed} == {f"raw/{k}": len(v) for k, v in files.items()}
    assert {o["key"]: o["etag"] for o in listed} == etags

    paths = storage.download_prefix(f"s3://{s3_bucket}/raw", dst, multipart_chunksize=SMALL_PART)
    assert sorted(p.relative_to(dst).as_posix() for p in paths) == sorted(files)
    assert tree_of(dst) == files

    only = storage.download_prefix(f"s3://{s3_bucket}/raw/s1/", tmp_path / "only", suffixes=[".MP4", ".wav"])
    assert [p.relative_to(tmp_path / "only").as_posix() for p in only] == ["take1.mp4"]


def test_prefix_is_a_folder_not_a_string_prefix(s3_env, s3_bucket, tmp_path):
    client = s3_env.client()
    for key in ("raw/a.mp4", "rawhide/b.mp4", "raw"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    got = storage.download_prefix(f"s3://{s3_bucket}/raw", tmp_path / "d")
    assert sorted(p.name for p in got) == ["a.mp4", "raw"]  # the object `raw` itself, not rawhide/


def test_upload_file_to_folder_uri_and_single_object(s3_env, s3_bucket, tmp_path):
    f = tmp_path / "clip.mp4"
    f.write_bytes(b"abc" * 100)
    etag = storage.upload_file(f, f"s3://{s3_bucket}/in/")
    assert etag == storage.file_md5(f)
    storage.upload_file(f, f"s3://{s3_bucket}/in/renamed.mp4")
    assert [o["key"] for o in storage.list_objects(f"s3://{s3_bucket}/in/")] == [
        "in/clip.mp4",
        "in/renamed.mp4",
    ]
    head = s3_env.client().head_object(Bucket=s3_bucket, Key="in/clip.mp4")
    assert head["Metadata"]["sha256"] == storage.file_sha256(f)
    with pytest.raises(StorageError, match="no such file"):
        storage.upload_file(tmp_path / "missing.mp4", f"s3://{s3_bucket}/in/")


def test_redownload_skips_verified_files_and_repairs_changed_ones(s3_env, s3_bucket, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = make_tree(src)
    uri = f"s3://{s3_bucket}/raw"
    storage.upload_dir(src, uri, multipart_threshold=SMALL_PART, multipart_chunksize=SMALL_PART)
    storage.download_prefix(uri, dst)
    before = {p: p.stat().st_ino for p in dst.rglob("*") if p.is_file()}

    calls = []
    client = s3_env.client()
    real = client.download_file
    client.download_file = lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1]
    storage.download_prefix(uri, dst, client=client)
    assert calls == [], "files with the same size and checksum are not fetched again"
    assert {p: p.stat().st_ino for p in before} == before

    # Same size, different bytes: the checksum (MD5 ETag; sha256 metadata for the multipart one) catches it.
    for rel in ("a.txt", "s2/big.bin"):
        data = bytearray((dst / rel).read_bytes())
        data[5] ^= 0xFF
        (dst / rel).write_bytes(bytes(data))
    storage.download_prefix(uri, dst, client=client)
    assert sorted(calls) == ["raw/a.txt", "raw/s2/big.bin"]
    assert tree_of(dst) == files


def test_partial_files_are_never_taken_as_whole(s3_env, s3_bucket, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = make_tree(src)
    uri = f"s3://{s3_bucket}/raw"
    storage.upload_dir(src, uri, multipart_threshold=SMALL_PART, multipart_chunksize=SMALL_PART)

    # Leftovers of an interrupted earlier run: a stale temporary file and a truncated target.
    (dst / "s2").mkdir(parents=True)
    stale = dst / "s2" / ".big.bin.part99999"
    stale.write_bytes(files["s2/big.bin"][:SMALL_PART])
    (dst / "s2" / "big.bin").write_bytes(files["s2/big.bin"][:1000])
    storage.download_prefix(uri, dst)
    assert tree_of(dst) == files
    assert not list(dst.rglob(".*.part*")), "temporary files are cleaned up"

    # A download that dies half-way leaves neither the target nor its temporary file.
    client = s3_env.client()

    def dies_half_way(bucket, key, filename, **kwargs):
        Path(filename).write_bytes(b"half")
        raise ConnectionError("connection reset while downloading")

    client.download_file = dies_half_way
    fresh = tmp_path / "fresh"
    with pytest.raises(ConnectionError):
        storage.download_prefix(uri, fresh, client=client)
    assert not [p for p in fresh.rglob("*") if p.is_file()]

    # A transfer that returns wrong bytes of the right size is refused, not renamed into place.
    def corrupts(bucket, key, filename, **kwargs):
        size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        Path(filename).write_bytes(b"\0" * size)

    client.download_file = corrupts
    with pytest.raises(StorageError, match="does not match"):
        storage.download_prefix(f"s3://{s3_bucket}/raw/a.txt", tmp_path / "bad", client=client)
    assert not [p for p in (tmp_path / "bad").rglob("*") if p.is_file()]


def test_upload_dir_skips_unchanged_objects(s3_env, s3_bucket, tmp_path, monkeypatch):
    src = tmp_path / "src"
    files = make_tree(src)
    uri = f"s3://{s3_bucket}/up"
    first = storage.upload_dir(src, uri, multipart_threshold=SMALL_PART, multipart_chunksize=SMALL_PART)
    (src / "a.txt").write_bytes(b"changed")
    (src / ".hidden").write_bytes(b"not uploaded")
    sent = []
    real = transfer.upload_file
    monkeypatch.setattr(transfer, "upload_file", lambda p, u, **k: (sent.append(u), real(p, u, **k))[1])
    second = storage.upload_dir(src, uri, multipart_threshold=SMALL_PART, multipart_chunksize=SMALL_PART)
    assert sent == [f"{uri}/a.txt"]
    assert set(second) == set(first) == {f"up/{k}" for k in files}


def test_ensure_bucket_is_idempotent(s3_env):
    import uuid

    name = f"t-{uuid.uuid4().hex[:10]}"
    assert storage.ensure_bucket(name) is True
    assert storage.ensure_bucket(name) is False
    assert name in [b["Name"] for b in s3_env.client().list_buckets()["Buckets"]]


def test_missing_bucket_error_names_the_uri(s3_env):
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-here/x.*NoSuchBucket"):
        storage.list_objects("s3://no-such-bucket-here/x")


# -------------------------------------------------------------------------------------- credentials


def test_wrong_credentials_are_refused(s3_env, s3_bucket, monkeypatch):
    uri = f"s3://{s3_bucket}/x"
    wrong_secret = "definitely-not-the-secret"
    with pytest.raises(StorageError) as err:
        storage.list_objects(uri, client=s3_env.client(secret_key=wrong_secret))
    assert uri in str(err.value) and "SignatureDoesNotMatch" in str(err.value)
    assert "AWS_SECRET_ACCESS_KEY" in str(err.value)
    assert wrong_secret not in str(err.value) and s3_env.secret_key not in str(err.value)

    with pytest.raises(StorageError, match="InvalidAccessKeyId"):
        storage.list_objects(uri, client=s3_env.client(access_key="nobody", secret_key=wrong_secret))

    # The environment is where s3_client takes its keys from.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    with pytest.raises(StorageError, match="SignatureDoesNotMatch"):
        storage.list_objects(uri)
    with pytest.raises(StorageError, match="SignatureDoesNotMatch"):
        storage.upload_file(__file__, uri + "/")


def test_no_credentials_is_a_clear_error(monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID"):
        storage.s3_client(endpoint_url="http://127.0.0.1:9")


def test_endpoint_resolution(monkeypatch):
    from singer.config import S3Config

    monkeypatch.setenv("SINGER_S3_ENDPOINT_URL", "http://127.0.0.1:1234")
    assert storage.resolve_endpoint() == "http://127.0.0.1:1234"
    assert storage.resolve_endpoint(endpoint_url="http://127.0.0.1:9") == "http://127.0.0.1:9"
    assert storage.resolve_endpoint(S3Config(endpoint_url="http://127.0.0.1:5")) == "http://127.0.0.1:1234"
    assert storage.resolve_endpoint(S3Config()) == "http://127.0.0.1:1234"
    monkeypatch.delenv("SINGER_S3_ENDPOINT_URL")
    assert storage.resolve_endpoint(S3Config(endpoint_url="http://127.0.0.1:5")) == "http://127.0.0.1:5"
    assert storage.resolve_endpoint() is None


# ------------------------------------------------------------------------------------------- server


def test_server_stop_start_keeps_data(s3_env, s3_bucket, tmp_path):
    f = tmp_path / "keep.bin"
    f.write_bytes(os.urandom(50_000))
    etag = storage.upload_file(f, f"s3://{s3_bucket}/keep/")
    endpoint = s3_env.endpoint_url
    with s3_env.stopped():
        assert not s3_env.running()
        with pytest.raises(StorageError, match=rf"s3://{s3_bucket}/keep/.*(Connect|connect)"):
            storage.list_objects(
                f"s3://{s3_bucket}/keep/", client=s3_env.client(max_attempts=1, connect_timeout=1)
            )
    assert s3_env.running() and s3_env.endpoint_url == endpoint
    assert not s3_env.serving  # restarted: the next s3_env fixture would wait for it, and so does this test
    s3_env.wait_serving(s3_bucket)  # it answers at once, but reads and writes only once its volume is back
    assert s3_env.serving
    assert storage.list_objects(f"s3://{s3_bucket}/keep/") == [
        {"key": "keep/keep.bin", "size": 50_000, "etag": etag}
    ]
    storage.download_prefix(f"s3://{s3_bucket}/keep/", tmp_path / "back")
    assert (tmp_path / "back" / "keep.bin").read_bytes() == f.read_bytes()


def test_wait_serving_waits_out_internal_errors_and_gives_up_with_the_last_one(s3_env, s3_bucket, monkeypatch):
    """What a restarted SeaweedFS does on a loaded machine (InternalError on writes for a while), made
    deterministic: the first 3 puts are refused. The helper the restart tests use tries again until a put
    and a get work, and after its deadline fails naming the last error."""
    from botocore.exceptions import ClientError

    real_client = type(s3_env).client
    refusals = {"left": 3, "puts": 0}

    def flaky_client(self, *args, **kwargs):
        client = real_client(self, *args, **kwargs)
        put = client.put_object

        def put_object(**kw):
            refusals["puts"] += 1
            if refusals["left"] > 0:
                refusals["left"] -= 1
                raise ClientError({"Error": {"Code": "InternalError", "Message": "We encountered an internal error"}},
                                  "PutObject")
            return put(**kw)

        client.put_object = put_object
        return client

    monkeypatch.setattr(type(s3_env), "client", flaky_client)
    assert s3_env.wait_serving(s3_bucket, interval=0.01) == 4
    assert refusals == {"left": 0, "puts": 4}
    assert "Contents" not in s3_env.client().list_objects_v2(Bucket=s3_bucket)  # the probe object is gone

    refusals["left"] = 10 ** 6
    with pytest.raises(AssertionError, match=r"did not serve a put and a get within 0 s .*InternalError"):
        s3_env.wait_serving(s3_bucket, timeout=0.3, interval=0.05)
    assert refusals["puts"] > 5


def test_server_files_are_private_and_secret_free(s3_server):
    state = read_state(s3_server.data_dir)
    assert state["endpoint_url"] == s3_server.endpoint_url and state["pid"] == s3_server.pid
    assert s3_server.secret_key not in json.dumps(state)
    assert s3_server.secret_key not in s3_server.log_file.read_text(errors="replace")
    identities = s3_server.state_dir / "identities.json"
    assert stat.S_IMODE(identities.stat().st_mode) == 0o600
    assert all(p + GRPC_OFFSET < 65536 for p in s3_server.ports.values())


def test_identities_example_has_the_generated_shape():
    from singer.storage import identities_json

    example = json.loads((Path(__file__).parents[1] / "infra" / "s3" / "identities.example.json").read_text())
    generated = json.loads(identities_json("ak", "sk"))
    assert set(example) == set(generated) == {"identities"}
    for ident in example["identities"]:
        assert set(ident) == set(generated["identities"][0])
        assert set(ident["credentials"][0]) == {"accessKey", "secretKey"}


def _run_py(code: str, env: dict | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env or os.environ.copy(),
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_start_server_detached_then_stop_from_another_process(tmp_path, monkeypatch):
    """What `singer s3 up` / `status` / `down` do: the server outlives the process that started it."""
    data = tmp_path / "s3"
    (port,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    printed = _run_py(
        "import json; from singer.storage import start_server; "
        f"print(json.dumps(start_server({str(data)!r}, port={port}, buckets=['singer'])))",
        env,
    )
    info = json.loads(printed.strip().splitlines()[-1])
    try:
        assert info["endpoint_url"] == f"http://127.0.0.1:{port}" and not info["already_running"]
        creds = Path(info["credentials_file"])
        assert info["credentials_source"] == "generated"
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        secret = creds.read_text().split("AWS_SECRET_ACCESS_KEY=")[1].split()[0]
        assert secret not in printed and secret not in (data / ".s3" / "weed.log").read_text(errors="replace")

        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(key, raising=False)
        status = server_status(data)  # from this process: finds it through state.json + credentials.env
        assert status["running"] and status["ready"], status
        assert start_server(data, port=port)["already_running"] is True

        ak = info["access_key"]
        client = storage.s3_client(endpoint_url=info["endpoint_url"], access_key=ak, secret_key=secret)
        assert [b["Name"] for b in client.list_buckets()["Buckets"]] == ["singer"]
    finally:
        stopped = _run_py(f"from singer.storage import stop_server; print(stop_server({str(data)!r}))", env)
    assert stopped.strip() == "True"
    assert not server_status(data)["running"]
    left = [s for p in info["ports"].values() for s in Path("/tmp").glob(f"seaweedfs-*-{p}.sock")]
    assert not left, (left, info["ports"], sorted(Path("/tmp").glob("seaweedfs-*")))
    assert stop_server(data) is False
