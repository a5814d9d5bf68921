"""The gRPC contract's Python package (the proto package gvpo.v1); see proto/generate.py."""
