"""Object storage: URIs and S3 access (s3), and a local S3 server for one machine (seaweedfs)."""
