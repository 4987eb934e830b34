// Command floorgo is the compiled gRPC floor (path F of the benchmark): a grpc-go
// server of tokenwire.v1.GenerationService/Generate that writes one Token per token
// from a timer, with no upstream and nothing else per call, exactly like
// bench/floor_grpc.py (path G) does in Python. Side by side, the two show what the
// gRPC runtime itself costs per message in each language, below any gateway logic.
//
// The prompt sets the stream (`tokens=N interval_us=U`), each token's text is a space
// and the emission time in Unix ns as 16 hex digits, and messages are encoded with
// protowire against the field numbers of protos/tokenwire/v1 (Token: text 1, done 2,
// finish_reason 5, chunk_count 8), so the compiled reader measures it as it measures
// tokenwire.
//
//	floorgo -listen 127.0.0.1:50061
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/tokenwire/tokenwire/bench/rawcodec"
)

// prompt pulls field 2 (prompt) out of a GenerateRequest.
func prompt(b []byte) string {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return ""
		}
		b = b[n:]
		if num == 2 && typ == protowire.BytesType {
			v, _ := protowire.ConsumeBytes(b)
			return string(v)
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return ""
		}
		b = b[m:]
	}
	return ""
}

func words(p string) (tokens int, interval time.Duration) {
	tokens = 256
	for _, w := range strings.Fields(p) {
		key, value, _ := strings.Cut(w, "=")
		switch key {
		case "tokens":
			tokens, _ = strconv.Atoi(value)
		case "interval_us":
			us, _ := strconv.ParseFloat(value, 64)
			interval = time.Duration(us * float64(time.Microsecond))
		}
	}
	return tokens, interval
}

func generate(_ any, stream grpc.ServerStream) error {
	var req []byte
	if err := stream.RecvMsg(&req); err != nil {
		return err
	}
	tokens, interval := words(prompt(req))
	start := time.Now()
	for i := 0; i < tokens; i++ {
		if interval > 0 {
			if d := time.Until(start.Add(time.Duration(i) * interval)); d > 0 {
				time.Sleep(d)
			}
		}
		msg := protowire.AppendTag(nil, 1, protowire.BytesType)
		msg = protowire.AppendString(msg, fmt.Sprintf(" %016x", time.Now().UnixNano()))
		msg = protowire.AppendTag(msg, 8, protowire.VarintType)
		msg = protowire.AppendVarint(msg, 1)
		if err := stream.SendMsg(&msg); err != nil {
			return err
		}
	}
	msg := protowire.AppendTag(nil, 2, protowire.VarintType)
	msg = protowire.AppendVarint(msg, 1)
	msg = protowire.AppendTag(msg, 5, protowire.VarintType)
	msg = protowire.AppendVarint(msg, 1) // FINISH_REASON_STOP
	return stream.SendMsg(&msg)
}

var serviceDesc = grpc.ServiceDesc{
	ServiceName: "tokenwire.v1.GenerationService",
	HandlerType: (*any)(nil),
	Streams: []grpc.StreamDesc{
		{StreamName: "Generate", Handler: generate, ServerStreams: true},
	},
}

func main() {
	listen := flag.String("listen", "127.0.0.1:50061", "address to serve on")
	flag.Parse()
	encoding.RegisterCodec(rawcodec.Codec{})
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer(grpc.MaxConcurrentStreams(2048))
	srv.RegisterService(&serviceDesc, nil)
	log.Fatal(srv.Serve(lis))
}
