"""Upload one file with boto3 — the per-file process that `inotifywait | while read` starts for each file."""

import os
import sys

import boto3
from botocore.config import Config

path = sys.argv[1]
root = os.environ["BENCH_WATCH_DIR"]
client = boto3.client(
    "s3", endpoint_url=os.environ["BENCH_ENDPOINT"], config=Config(s3={"addressing_style": "path"})
)
with open(path, "rb") as body:
    client.put_object(Bucket=os.environ["BENCH_BUCKET"], Key=os.path.relpath(path, root), Body=body)
