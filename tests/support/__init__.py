"""Real-component test infrastructure: a moto S3 server subprocess, an R2-strict faulting proxy,
a sidecar daemon runner and polling helpers. Nothing here mocks or patches boto3."""
