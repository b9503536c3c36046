"""comfyui-r2-sidecar: upload every finished ComfyUI output to R2/S3, durably and exactly once."""

__version__ = "0.1.0"
