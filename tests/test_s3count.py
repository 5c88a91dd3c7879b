"""The counting proxy (tests/s3count.py) records each request it relays to the real SeaweedFS
server with its method, key, status and body bytes: plain and multipart uploads, whole and ranged
reads, HEAD (an answer that announces a length but has no body), listing and batched delete, over
kept-alive connections, and a request the fault proxy cut."""

import time
from collections import Counter

import boto3
import botocore.config
import pytest
from s3count import CountingProxy
from s3server import ACCESS_KEY, SECRET_KEY, bucket_counts

MIB = 1 << 20


@pytest.fixture
def counted(seaweedfs, s3_bucket):
    proxy = CountingProxy(seaweedfs.ports["s3.port"])
    client = boto3.client("s3", endpoint_url=proxy.endpoint, region_name="us-east-1",
                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                          config=botocore.config.Config(s3={"addressing_style": "path"},
                                                        retries={"total_max_attempts": 1}))
    yield proxy, client, s3_bucket
    client.close()
    proxy.close()


def summary(requests):
    return [(r.method, r.path, r.status, r.bytes_up, r.bytes_down) for r in requests]


def test_each_request_is_recorded_with_its_body_bytes(counted):
    proxy, client, bucket = counted
    body = bytes(range(256)) * 4096  # 1 MiB
    client.put_object(Bucket=bucket, Key="packs/ab/one pack", Body=body)
    assert client.get_object(Bucket=bucket, Key="packs/ab/one pack")["Body"].read() == body
    got = client.get_object(Bucket=bucket, Key="packs/ab/one pack", Range="bytes=10-109")
    assert got["Body"].read() == body[10:110]
    client.head_object(Bucket=bucket, Key="packs/ab/one pack")
    with pytest.raises(client.exceptions.ClientError):
        client.get_object(Bucket=bucket, Key="maps/missing")
    requests = proxy.take()
    assert summary(requests[:4]) == [
        ("PUT", f"/{bucket}/packs/ab/one pack", 200, MIB, 0),
        ("GET", f"/{bucket}/packs/ab/one pack", 200, 0, MIB),
        ("GET", f"/{bucket}/packs/ab/one pack", 206, 0, 100),
        ("HEAD", f"/{bucket}/packs/ab/one pack", 200, 0, 0),
    ]
    missing = requests[4]
    assert (missing.method, missing.path, missing.status) == ("GET", f"/{bucket}/maps/missing", 404)
    assert missing.bytes_down > 0 and len(requests) == 5  # the error document
    assert proxy.take() == []  # taken once


def test_listing_multipart_and_batched_delete(counted):
    proxy, client, bucket = counted
    upload = client.create_multipart_upload(Bucket=bucket, Key="big")["UploadId"]
    parts = []
    for number, size in ((1, 5 * MIB), (2, 3)):
        etag = client.upload_part(Bucket=bucket, Key="big", UploadId=upload, PartNumber=number,
                                  Body=b"x" * size)["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    client.complete_multipart_upload(Bucket=bucket, Key="big", UploadId=upload,
                                     MultipartUpload={"Parts": parts})
    listed = client.list_objects_v2(Bucket=bucket, Prefix="b")
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "big"}]})
    requests = proxy.take()
    assert [(r.method, r.path) for r in requests] == [
        ("POST", f"/{bucket}/big"), ("PUT", f"/{bucket}/big"), ("PUT", f"/{bucket}/big"),
        ("POST", f"/{bucket}/big"), ("GET", f"/{bucket}"), ("POST", f"/{bucket}")]
    assert "uploads" in requests[0].query and requests[1].query["partNumber"] == "1"
    assert [r.bytes_up for r in requests[1:3]] == [5 * MIB, 3]
    assert requests[4].query["list-type"] == "2" and requests[4].bytes_down > 0
    assert listed["KeyCount"] == 1 and "delete" in requests[5].query
    assert all(r.status == 200 for r in requests)


def test_a_request_the_fault_proxy_cut_is_not_counted_as_answered(counted):
    proxy, client, bucket = counted
    proxy.arm("503", 1)
    with pytest.raises(client.exceptions.ClientError):
        client.get_object(Bucket=bucket, Key="k")
    client.put_object(Bucket=bucket, Key="k", Body=b"abc")
    assert summary(proxy.take()) == [("PUT", f"/{bucket}/k", 200, 3, 0)]
    assert proxy.served == 1


def billed(request) -> str:
    """A request's type as the server counts it: a HEAD among the GETs, a listing as LIST, a
    batched delete as DELETE."""
    if request.method == "HEAD" or (request.method == "GET" and request.path.count("/") > 1):
        return "GET"
    if request.method == "GET":
        return "LIST"
    return "DELETE" if request.method == "POST" and "delete" in request.query else request.method


def test_the_server_counts_a_buckets_requests_as_the_proxy_does(counted, seaweedfs):
    """bench/s3.py times the tools straight against the server and counts their requests with
    the server's own per-bucket counters instead of the proxy: the same requests by type, and the
    objects' bytes each way (not the XML of listings, deletes and multipart calls)."""
    proxy, client, bucket = counted
    before = bucket_counts(seaweedfs, bucket)
    body = bytes(range(256)) * 4096
    client.put_object(Bucket=bucket, Key="packs/ab/one", Body=body)
    client.get_object(Bucket=bucket, Key="packs/ab/one", Range="bytes=10-109")["Body"].read()
    client.head_object(Bucket=bucket, Key="packs/ab/one")
    upload = client.create_multipart_upload(Bucket=bucket, Key="big")["UploadId"]
    etag = client.upload_part(Bucket=bucket, Key="big", UploadId=upload, PartNumber=1,
                              Body=b"x" * 3)["ETag"]
    client.complete_multipart_upload(Bucket=bucket, Key="big", UploadId=upload,
                                     MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
    client.list_objects_v2(Bucket=bucket)
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "big"}]})
    requests = proxy.take()
    expected = Counter(billed(r) for r in requests)
    expected["up"] = sum(r.bytes_up for r in requests if r.method == "PUT")
    expected["down"] = sum(r.bytes_down for r in requests if billed(r) == "GET")
    assert expected == Counter(PUT=2, GET=2, POST=2, LIST=1, DELETE=1, up=MIB + 3, down=100)
    deadline = time.monotonic() + 5  # counted as each answer ends
    while (counts := bucket_counts(seaweedfs, bucket) - before) != expected:
        assert time.monotonic() < deadline, (counts, expected)
        time.sleep(0.05)
