// Package rawcodec is a gRPC codec that passes encoded messages through as bytes, for
// the benchmark's Go programs: they build and parse tokenwire messages with protowire
// against the field numbers of protos/tokenwire/v1, with no generated code.
package rawcodec

// Codec registers under "proto", so peers see ordinary protobuf messages.
type Codec struct{}

// Name is the content-subtype gRPC puts on the wire.
func (Codec) Name() string { return "proto" }

// Marshal returns the message's bytes as they are.
func (Codec) Marshal(v any) ([]byte, error) {
	return *(v.(*[]byte)), nil
}

// Unmarshal copies the received bytes into the caller's slice.
func (Codec) Unmarshal(data []byte, v any) error {
	p := v.(*[]byte)
	*p = append((*p)[:0], data...)
	return nil
}
