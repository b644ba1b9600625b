"""Sets up a fresh moto_server for tests/remote.rs: a bucket, an IAM user allowed everything
on S3 (read-write) and one allowed only to read, then turns authentication on (from then on
every request must be signed by one of them). Prints the credentials as one JSON line.

Usage: moto_setup.py ENDPOINT BUCKET
"""

import json
import sys
import urllib.request

import boto3

endpoint, bucket = sys.argv[1], sys.argv[2]
# Before authentication is on, any key is accepted.
session = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
boto3.client("s3", **session).create_bucket(Bucket=bucket)
iam = boto3.client("iam", **session)


def user(name, actions):
    iam.create_user(UserName=name)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    iam.put_user_policy(UserName=name, PolicyName=f"{name}-s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}


users = {"rw": user("writer", ["s3:*"]), "ro": user("reader", ["s3:GetObject", "s3:ListBucket"])}
# Authentication on: unsigned or unknown requests are refused, IAM policies apply.
reset = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"})
urllib.request.urlopen(reset).read()
print(json.dumps(users))
