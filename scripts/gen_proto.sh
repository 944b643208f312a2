#!/usr/bin/env bash
# Regenerates server/wire/tinker_public_pb2.py (needs grpcio-tools; run from anywhere).
set -euo pipefail
cd "$(dirname "$0")/../server/wire" && python -m grpc_tools.protoc -I. --python_out=. tinker_public.proto
