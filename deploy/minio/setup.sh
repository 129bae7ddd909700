#!/bin/sh
# One-shot (minio/mc): the artifact bucket and the account LockN Tune uses, which may do
# anything inside that bucket and nothing else. Safe to run on every start.
set -eu

mc alias set lockn http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "lockn/$S3_BUCKET"

policy=/tmp/lockn-tune-policy.json
cat > "$policy" <<JSON
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:*"],
      "Resource": ["arn:aws:s3:::$S3_BUCKET", "arn:aws:s3:::$S3_BUCKET/*"]
    }
  ]
}
JSON
mc admin policy create lockn lockn-tune "$policy"
# Adding an existing user sets its secret key again, so a changed S3_SECRET_KEY takes effect.
mc admin user add lockn "$S3_ACCESS_KEY" "$S3_SECRET_KEY"
if ! mc admin user info lockn "$S3_ACCESS_KEY" | grep -q 'lockn-tune'; then
    mc admin policy attach lockn lockn-tune --user "$S3_ACCESS_KEY"
fi
echo "bucket $S3_BUCKET and user $S3_ACCESS_KEY are ready"
