"""The storage layer on a local disk and on a real S3 API server: the same calls, the same results; the one commit
replaces what was there, writes its marker last, and readers see only the files the marker names."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loft_dist import storage
from loft_dist.errors import ConfigError, StorageError


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    return f"s3://{server.bucket()}/runs"


def _parquet(location: str, rows: int) -> None:
    with storage.open_output(location) as f:
        pq.write_table(pa.table({"id": list(range(rows))}), f)


def test_json_round_trip_listing_and_removal(where):
    storage.write_json(storage.join(where, "a", "state.json"), {"completed": ["prepare"]})
    assert storage.read_json(storage.join(where, "a", "state.json")) == {"completed": ["prepare"]}
    assert storage.is_dir(storage.join(where, "a")) and storage.is_file(storage.join(where, "a", "state.json"))
    assert storage.listdir(where) == ["a"] and storage.listdir(storage.join(where, "nothing")) == []
    storage.remove(storage.join(where, "a"))
    assert not storage.exists(storage.join(where, "a"))
    with pytest.raises(StorageError, match="not found"):
        storage.read_json(storage.join(where, "a", "state.json"))


def test_commit_replaces_the_old_version_and_readers_see_only_the_marked_files(where):
    final = storage.join(where, "table")
    old = storage.staging(final)
    _parquet(storage.join(old, "part-0.parquet"), 5)
    storage.commit(old, final, {"rows": 5})
    assert [storage.name(f) for f in storage.committed_files(final)] == ["part-0.parquet"]

    new = storage.staging(final)
    _parquet(storage.join(new, "part-a.parquet"), 2)
    _parquet(storage.join(new, "part-b.parquet"), 3)
    with pytest.raises(StorageError, match="not a complete table"):
        storage.committed(storage.join(where, "not-yet"))
    record = storage.commit(new, final, {"rows": 5})
    assert record == {"files": ["part-a.parquet", "part-b.parquet"], "rows": 5}
    assert storage.read_json(storage.join(final, storage.SUCCESS)) == record
    assert not storage.exists(new), "the staging location is gone after the commit"
    # A killed writer's leftover beside the committed files is never read.
    _parquet(storage.join(final, "part-zz-leftover.parquet"), 7)
    files = storage.committed_files(final)
    assert [storage.name(f) for f in files] == ["part-a.parquet", "part-b.parquet"]
    assert sum(pq.ParquetFile(storage.open_input(f)).metadata.num_rows for f in files) == 5


def test_stale_staging_is_removed(where):
    final = storage.join(where, "t")
    st = storage.staging(final)
    storage.write_text(storage.join(st, "x.parquet"), "half")
    storage.remove_stale_staging(final)
    assert storage.listdir(where) == []


def test_local_dir_of_a_remote_directory_is_a_download(where):
    storage.write_text(storage.join(where, "ckpt", "weights.txt"), "w")
    storage.write_text(storage.join(where, "ckpt", "sub", "state.json"), "{}")
    with storage.local_dir(storage.join(where, "ckpt")) as d:
        assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) == ["sub/state.json",
                                                                                         "weights.txt"]


def test_upload_dir_copies_a_tree(where, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "d" / "b.txt").write_text("b")
    storage.upload_dir(src, storage.join(where, "up"))
    assert storage.read_text(storage.join(where, "up", "d", "b.txt")) == "b"


def test_missing_bucket_and_bad_uri_are_one_line_errors_naming_the_key(s3_server):
    with pytest.raises(StorageError) as e:
        storage.check_writable("s3://loft-no-such-bucket-here/runs", "run.storage_path")
    msg = str(e.value)
    assert "run.storage_path=s3://loft-no-such-bucket-here/runs" in msg and "bucket exists" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match="not a storage location"):
        storage.resolve("nosuchscheme://x/y")


def test_a_readonly_local_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="scoring.output=/proc/loft-dist-test/out: cannot create or write"):
        storage.check_writable("/proc/loft-dist-test/out", "scoring.output")


@pytest.mark.s3
def test_a_read_only_bucket_and_unknown_credentials_stop_a_run_in_one_line_before_ray(monkeypatch, capsys):
    """A server that checks credentials and IAM policies: `loft-dist run` into a bucket its user may only read, then
    with a key the server does not know, exits 2 with one line naming run.storage_path, and starts nothing."""
    import json

    from s3_server import S3Server

    from loft_dist.cli import main

    server = S3Server(auth_after=4).start()
    try:
        server.client().create_bucket(Bucket="loft-read-only")
        server.client("iam").create_user(UserName="reader")
        key = server.client("iam").create_access_key(UserName="reader")["AccessKey"]
        server.client("iam").put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}))
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)  # restored after; the run sets it from the key
        for key_id, secret, why in [(key["AccessKeyId"], key["SecretAccessKey"], "Access Denied"),
                                    ("AKIANOBODY", "nothing", "Access Key Id you provided does not exist")]:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            assert main(["run", "configs/tiny.yaml", "run.storage_path=s3://loft-read-only/runs",
                         f"run.s3_endpoint={server.endpoint}"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("loft-dist: error: cannot write "
                                                      "run.storage_path=s3://loft-read-only/runs"), err
            assert why in err[0] and "credentials" in err[0]
        import boto3

        reader = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=key["AccessKeyId"],
                              aws_secret_access_key=key["SecretAccessKey"], region_name="us-east-1")
        assert reader.list_objects_v2(Bucket="loft-read-only").get("KeyCount") == 0
    finally:
        server.stop()
