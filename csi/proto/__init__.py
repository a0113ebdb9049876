"""Generated CSI v1 protobuf/gRPC stubs; regenerate with tools/gen_proto.py."""
