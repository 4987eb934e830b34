// The module named by go_package in protos/tokenwire/v1/generation.proto.
// Only this file is committed: `buf generate` (buf.gen.yaml) writes the
// *.pb.go files next to it at build time.
module github.com/tokenwire/tokenwire/gen/go

go 1.26.0

require (
	google.golang.org/genproto/googleapis/api v0.0.0-20261019180522-ce908d29299b
	google.golang.org/grpc v1.85.0
	google.golang.org/protobuf v1.36.12
)
