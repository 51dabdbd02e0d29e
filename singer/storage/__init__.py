"""S3 with boto3 (retries, multipart transfers, verified downloads), the DVC remote, and a local S3 server.

    client = s3_client(cfg.s3)                                   # endpoint from params / SINGER_S3_ENDPOINT_URL
    ensure_bucket("singer", client=client)
    upload_file("clip.mp4", "s3://singer/raw/a/")                # -> ETag; key raw/a/clip.mp4
    list_objects("s3://singer/raw")                              # [{"key", "size", "etag"}, ...]
    download_prefix("s3://singer/raw", "data/raw", suffixes=[".mp4"])

    with S3Server("/tmp/s3data", port=0) as server:              # SeaweedFS on 127.0.0.1, for tests
        server.client().list_buckets()
    start_server(".s3"); server_status(".s3"); stop_server(".s3")  # `singer s3 up | status | down`

    s3.py           the client, URIs, errors, buckets, listing, deleting
    transfer.py     checksums, uploads and verified downloads
    dvc_remote.py   the DVC remote on S3 (`.dvc/config`)
    server.py       `S3Server`: one `weed mini` child process
    server_state.py its binary, ports, credentials and `state.json`
    service.py      the detached server of `singer s3 up | down | status`
"""

from singer.storage.dvc_remote import configure_dvc_remote
from singer.storage.s3 import (
    CONNECT_TIMEOUT,
    MAX_ATTEMPTS,
    READ_TIMEOUT,
    StorageError,
    delete_prefix,
    ensure_bucket,
    list_objects,
    parse_s3_uri,
    resolve_endpoint,
    s3_client,
    s3_uri,
)
from singer.storage.server import S3Server, probe
from singer.storage.server_state import (
    DEFAULT_PORT,
    GRPC_OFFSET,
    HOST,
    STOP_TIMEOUT,
    S3ServerError,
    ServerInfo,
    free_ports,
    identities_json,
    port_pair_free,
    read_credentials,
    read_state,
    resolve_credentials,
    weed_binary,
)
from singer.storage.service import client_env, server_status, start_server, stop_server
from singer.storage.transfer import (
    MULTIPART_CHUNKSIZE,
    MULTIPART_THRESHOLD,
    MiB,
    download_prefix,
    file_md5,
    file_sha256,
    multipart_etag,
    transfer_config,
    upload_dir,
    upload_file,
    verify_file,
)

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_PORT",
    "GRPC_OFFSET",
    "HOST",
    "MAX_ATTEMPTS",
    "MULTIPART_CHUNKSIZE",
    "MULTIPART_THRESHOLD",
    "READ_TIMEOUT",
    "STOP_TIMEOUT",
    "MiB",
    "S3Server",
    "S3ServerError",
    "ServerInfo",
    "StorageError",
    "client_env",
    "configure_dvc_remote",
    "delete_prefix",
    "download_prefix",
    "ensure_bucket",
    "file_md5",
    "file_sha256",
    "free_ports",
    "identities_json",
    "list_objects",
    "multipart_etag",
    "parse_s3_uri",
    "port_pair_free",
    "probe",
    "read_credentials",
    "read_state",
    "resolve_credentials",
    "resolve_endpoint",
    "s3_client",
    "s3_uri",
    "server_status",
    "start_server",
    "stop_server",
    "transfer_config",
    "upload_dir",
    "upload_file",
    "verify_file",
    "weed_binary",
]
