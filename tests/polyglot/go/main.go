// Command polyglot-go calls tokenwire with Go stubs generated from protos/ by
// `buf generate` (buf.gen.yaml at the repo root), running the scenarios listed
// in ../scenarios.json.
//
//	polyglot-go <host:port> <scenario>   one JSON line on stdout
//	polyglot-go golden                   hex of the golden GenerateRequest
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"

	tokenwirev1 "github.com/tokenwire/tokenwire/gen/go/tokenwire/v1"
)

// report is the one JSON line a scenario prints.
type report map[string]any

type scenario struct {
	expect codes.Code
	run    func(ctx context.Context, conn *grpc.ClientConn, r report) error
}

var scenarios = map[string]scenario{
	"generate_stream":   {codes.OK, generateStream},
	"chat_history":      {codes.OK, chatHistory},
	"cancel_after_2":    {codes.Canceled, cancelAfter2},
	"deadline":          {codes.DeadlineExceeded, deadline},
	"not_found":         {codes.NotFound, notFound},
	"invalid_argument":  {codes.InvalidArgument, invalidArgument},
	"health":            {codes.OK, health},
	"list_models":       {codes.OK, listModels},
	"resume_after_drop": {codes.OK, resumeAfterDrop},
	"start_and_cancel":  {codes.OK, startAndCancel},
	"retry_replicas":    {codes.OK, retryReplicas},
}

func main() {
	if len(os.Args) == 2 && os.Args[1] == "golden" {
		data, err := proto.MarshalOptions{Deterministic: true}.Marshal(goldenRequest())
		if err != nil {
			fail(err)
		}
		fmt.Println(hex.EncodeToString(data))
		return
	}
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: polyglot-go <host:port> <scenario> | polyglot-go golden")
		os.Exit(2)
	}
	target, name := os.Args[1], os.Args[2]
	sc, known := scenarios[name]
	if !known {
		fail(fmt.Errorf("unknown scenario %q", name))
	}
	conn, err := grpc.NewClient(channelTarget(target), channelOptions(target)...)
	if err != nil {
		fail(err)
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r := report{"scenario": name, "lang": "go"}
	err = sc.run(ctx, conn, r)
	code := status.Code(err) // OK for nil
	r["code"] = codeName(code)
	r["ok"] = code == sc.expect
	if err != nil && code == codes.Unknown {
		r["error"] = err.Error()
	}
	line, _ := json.Marshal(r)
	fmt.Println(string(line))
	if os.Getenv("TOKENWIRE_POLYGLOT_HOLD") == "1" {
		_, _ = io.Copy(io.Discard, os.Stdin) // keep the channel open until told
	}
}

// channelTarget and channelOptions: the target as given, except an ipv4: list
// (ipv4:ADDR,ADDR...), which grpc-go has no resolver for: a manual resolver gives
// its addresses instead. With TOKENWIRE_SERVICE_CONFIG (a file), the channel uses
// that service config, the one the Python client applies by default.
func channelTarget(target string) string {
	if strings.HasPrefix(target, "ipv4:") {
		return "replicas:///tokenwire"
	}
	return target
}

func channelOptions(target string) []grpc.DialOption {
	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if path := os.Getenv("TOKENWIRE_SERVICE_CONFIG"); path != "" {
		config, err := os.ReadFile(path)
		if err != nil {
			fail(err)
		}
		opts = append(opts, grpc.WithDefaultServiceConfig(string(config)))
	}
	if list, ok := strings.CutPrefix(target, "ipv4:"); ok {
		replicas := manual.NewBuilderWithScheme("replicas")
		var addresses []resolver.Address
		for _, address := range strings.Split(list, ",") {
			addresses = append(addresses, resolver.Address{Addr: address})
		}
		replicas.InitialState(resolver.State{Addresses: addresses})
		opts = append(opts, grpc.WithResolvers(replicas))
	}
	return opts
}

// retryReplicas: the target lists a replica that cannot reach its engine and good
// ones; the service config retries what failed before a token, so each call
// succeeds.
func retryReplicas(ctx context.Context, conn *grpc.ClientConn, r report) error {
	var texts []string
	defer func() { r["calls_ok"], r["texts"] = len(texts), texts }()
	for i := 0; i < 4; i++ {
		stream, err := client(conn).Generate(ctx, &tokenwirev1.GenerateRequest{
			Model: "tiny", Prompt: "Why is the sky blue?",
		})
		if err != nil {
			return err
		}
		text := ""
		for {
			token, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return err
			}
			text += token.GetText()
		}
		texts = append(texts, text)
	}
	return nil
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "polyglot-go:", err)
	os.Exit(1)
}

func client(conn *grpc.ClientConn) tokenwirev1.GenerationServiceClient {
	return tokenwirev1.NewGenerationServiceClient(conn)
}

// consume reads a token stream to its end, printing each token as it arrives,
// and fills the report. maxTokens > 0 stops reading after that many messages
// and calls stop (the caller's cancel).
func consume(stream grpc.ServerStreamingClient[tokenwirev1.Token], started time.Time,
	r report, maxTokens int, stop func()) error {
	count, text := 0, ""
	defer func() { r["tokens"], r["text"] = count, text }()
	for {
		token, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		ms := float64(time.Since(started).Microseconds()) / 1000
		fmt.Fprintf(os.Stderr, "[%8.1f ms] %q\n", ms, token.GetText())
		if count == 0 {
			r["first_ms"] = ms
		}
		r["last_ms"] = ms
		count++
		text += token.GetText()
		final(token, r)
		if maxTokens > 0 && count == maxTokens {
			stop()
		}
	}
}

// final copies the fields of the final Token (done) into the report.
func final(token *tokenwirev1.Token, r report) {
	if token.GetDone() {
		r["finish_reason"] = token.GetFinishReason().String()
		r["completion_tokens"] = token.GetUsage().GetCompletionTokens()
		r["model"] = token.GetModel()
	}
}

// requestID is the x-request-id value in md, or "" when there is none.
func requestID(md metadata.MD) string {
	if values := md.Get("x-request-id"); len(values) > 0 {
		return values[0]
	}
	return ""
}

func generateStream(ctx context.Context, conn *grpc.ClientConn, r report) error {
	started := time.Now()
	stream, err := client(conn).Generate(ctx, &tokenwirev1.GenerateRequest{
		Model: "tiny", Prompt: "Why is the sky blue?",
	})
	if err != nil {
		return err
	}
	if err := consume(stream, started, r, 0, nil); err != nil {
		return err
	}
	header, err := stream.Header()
	if err != nil {
		return err
	}
	r["request_id_header"], r["request_id_trailer"] = requestID(header), requestID(stream.Trailer())
	return nil
}

func chatHistory(ctx context.Context, conn *grpc.ClientConn, r report) error {
	msg := func(role tokenwirev1.Role, content string) *tokenwirev1.Message {
		return &tokenwirev1.Message{Role: role, Content: content}
	}
	started := time.Now()
	stream, err := client(conn).Chat(ctx, &tokenwirev1.ChatRequest{
		Model: "tiny",
		Messages: []*tokenwirev1.Message{
			msg(tokenwirev1.Role_ROLE_SYSTEM, "You answer in one short sentence."),
			msg(tokenwirev1.Role_ROLE_USER, "Name a primary colour."),
			msg(tokenwirev1.Role_ROLE_ASSISTANT, "Red."),
			msg(tokenwirev1.Role_ROLE_USER, "Another one?"),
		},
	})
	if err != nil {
		return err
	}
	return consume(stream, started, r, 0, nil)
}

func cancelAfter2(ctx context.Context, conn *grpc.ClientConn, r report) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	started := time.Now()
	stream, err := client(conn).Generate(ctx, &tokenwirev1.GenerateRequest{
		Model: "tiny", Prompt: "Tell me a long story.",
	})
	if err != nil {
		return err
	}
	return consume(stream, started, r, 2, cancel)
}

// ready connects and waits until the channel is ready, so that a deadline
// measures the call, not the connection set-up.
func ready(ctx context.Context, conn *grpc.ClientConn) error {
	conn.Connect()
	for state := conn.GetState(); state != connectivity.Ready; state = conn.GetState() {
		if !conn.WaitForStateChange(ctx, state) {
			return ctx.Err()
		}
	}
	return nil
}

func deadline(ctx context.Context, conn *grpc.ClientConn, r report) error {
	if err := ready(ctx, conn); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 800*time.Millisecond)
	defer cancel()
	started := time.Now()
	defer func() { r["elapsed_ms"] = time.Since(started).Milliseconds() }()
	stream, err := client(conn).Generate(ctx, &tokenwirev1.GenerateRequest{
		Model: "tiny", Prompt: "Tell me a long story.",
	})
	if err != nil {
		return err
	}
	return consume(stream, started, r, 0, nil)
}

// richError copies the status message and the google.rpc details the
// scenarios look at into the report.
func richError(err error, r report) {
	st := status.Convert(err)
	r["message"] = st.Message()
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			r["reason"], r["domain"] = d.GetReason(), d.GetDomain()
		case *errdetails.ResourceInfo:
			r["resource_type"], r["resource_name"] = d.GetResourceType(), d.GetResourceName()
		case *errdetails.BadRequest:
			fields, descriptions := []string{}, []string{}
			for _, v := range d.GetFieldViolations() {
				fields = append(fields, v.GetField())
				descriptions = append(descriptions, v.GetDescription())
			}
			r["fields"], r["descriptions"] = fields, descriptions
		}
	}
}

func drain(ctx context.Context, conn *grpc.ClientConn, req *tokenwirev1.GenerateRequest, r report) error {
	stream, err := client(conn).Generate(ctx, req)
	if err == nil {
		for err == nil {
			_, err = stream.Recv()
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		r["request_id_trailer"] = requestID(stream.Trailer())
	}
	richError(err, r)
	return err
}

func notFound(ctx context.Context, conn *grpc.ClientConn, r report) error {
	ctx = metadata.AppendToOutgoingContext(ctx, "x-request-id", "polyglot-go")
	return drain(ctx, conn, &tokenwirev1.GenerateRequest{Model: "nope", Prompt: "p"}, r)
}

func invalidArgument(ctx context.Context, conn *grpc.ClientConn, r report) error {
	return drain(ctx, conn, &tokenwirev1.GenerateRequest{
		Model: "", Prompt: "p", Options: &tokenwirev1.Options{TopP: proto.Float64(2)},
	}, r)
}

func health(ctx context.Context, conn *grpc.ClientConn, r report) error {
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: ""})
	if err != nil {
		return err
	}
	r["status"] = resp.GetStatus().String()
	return nil
}

func listModels(ctx context.Context, conn *grpc.ClientConn, r report) error {
	resp, err := client(conn).ListModels(ctx, &tokenwirev1.ListModelsRequest{})
	if err != nil {
		return err
	}
	names, formats := []string{}, []string{}
	for _, m := range resp.GetModels() {
		names = append(names, m.GetName())
		formats = append(formats, m.GetFormat())
	}
	r["models"], r["formats"] = names, formats
	return nil
}

// follower reads a resumable stream across calls: its id (the first message
// carries only that), how many chunks it has received (position + chunk_count
// of the last Token: what Resume's after takes), and whether every Token
// began where the one before it ended.
type follower struct {
	streamID   string
	next       uint64
	contiguous bool
	started    time.Time
}

// read reads up to limit content messages of stream (0: to its end), printing
// each one's position and chunk count (never its text), and returns their
// text; the final Token's fields go into the report.
func (f *follower) read(stream grpc.ServerStreamingClient[tokenwirev1.Token], r report,
	limit int) (string, error) {
	text := ""
	for count := 0; limit == 0 || count < limit; {
		token, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return text, nil
		}
		if err != nil {
			return text, err
		}
		ms := float64(time.Since(f.started).Microseconds()) / 1000
		fmt.Fprintf(os.Stderr, "[%8.1f ms] position %d, %d chunk(s)\n",
			ms, token.GetPosition(), token.GetChunkCount())
		f.contiguous = f.contiguous && token.GetPosition() == f.next
		f.next = token.GetPosition() + uint64(token.GetChunkCount())
		if token.GetStreamId() != "" {
			f.streamID = token.GetStreamId()
			continue
		}
		count++
		text += token.GetText()
		final(token, r)
	}
	return text, nil
}

// resumeAfterDrop reads a resumable Generate's id and 3 messages, drops the
// call (cancels it and closes its channel: the server detaches, the model goes
// on), then reads the rest with Resume on a new channel.
func resumeAfterDrop(ctx context.Context, conn *grpc.ClientConn, r report) error {
	f := &follower{contiguous: true, started: time.Now()}
	defer func() { r["positions_contiguous"], r["chunks"] = f.contiguous, f.next }()
	callCtx, drop := context.WithCancel(ctx)
	defer drop()
	stream, err := client(conn).Generate(callCtx, &tokenwirev1.GenerateRequest{
		Model: "tiny", Prompt: "Tell me a long story.", Resumable: &tokenwirev1.Resumable{},
	})
	if err != nil {
		return err
	}
	before, err := f.read(stream, r, 3)
	r["text_before"], r["stream_id"], r["after"] = before, f.streamID, f.next
	if err != nil {
		return err
	}
	if f.streamID == "" {
		return errors.New("the first message of a resumable stream carried no stream_id")
	}
	drop()
	if err := conn.Close(); err != nil {
		return err
	}

	again, err := grpc.NewClient(conn.Target(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer again.Close()
	resumed, err := client(again).Resume(ctx, &tokenwirev1.ResumeRequest{
		StreamId: f.streamID, After: f.next,
	})
	if err != nil {
		return err
	}
	after, err := f.read(resumed, r, 0)
	r["text_after"] = after
	return err
}

// resumeToEnd reads Resume(streamID) from the start to its end: nil when the
// stream finished, else the status it ended with.
func resumeToEnd(ctx context.Context, c tokenwirev1.GenerationServiceClient, streamID string) error {
	stream, err := c.Resume(ctx, &tokenwirev1.ResumeRequest{StreamId: streamID})
	for err == nil {
		_, err = stream.Recv()
	}
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// startAndCancel starts a generation detached, cancels it, and reads what a
// Resume, a second Cancel and a Resume of an id never issued answer.
func startAndCancel(ctx context.Context, conn *grpc.ClientConn, r report) error {
	c := client(conn)
	started, err := c.Start(ctx, &tokenwirev1.StartRequest{
		Request: &tokenwirev1.StartRequest_Generate{Generate: &tokenwirev1.GenerateRequest{
			Model: "tiny", Prompt: "Tell me a long story.",
		}},
	})
	if err != nil {
		return err
	}
	id := started.GetStreamId()
	r["stream_id"] = id
	cancelled, err := c.Cancel(ctx, &tokenwirev1.CancelRequest{StreamId: id})
	if err != nil {
		return err
	}
	r["stopped"] = cancelled.GetStopped()
	r["resume_code"] = codeName(status.Code(resumeToEnd(ctx, c, id)))
	again, err := c.Cancel(ctx, &tokenwirev1.CancelRequest{StreamId: id})
	if err != nil {
		return err
	}
	r["stopped_again"] = again.GetStopped()
	r["unknown_code"] = codeName(status.Code(resumeToEnd(ctx, c, strings.Repeat("A", 24))))
	return nil
}

// goldenRequest is ../golden_request.json built with the Go API.
func goldenRequest() *tokenwirev1.GenerateRequest {
	// One key per map: grpcurl marshals map entries in Go's random map order,
	// so only single-entry maps give it stable bytes to compare.
	schema, err := structpb.NewStruct(map[string]any{
		"properties": map[string]any{
			"answer": map[string]any{"enum": []any{"yes", "no", 42.5, true, nil}},
		},
	})
	if err != nil {
		fail(err)
	}
	return &tokenwirev1.GenerateRequest{
		Model:  "smollm2:135m",
		Prompt: "Why is the sky blue? Réponds en une ligne ✨",
		System: "Answer in one line.",
		Options: &tokenwirev1.Options{
			Temperature:     proto.Float64(0), // explicit zero: present on the wire
			TopP:            proto.Float64(0.9),
			TopK:            proto.Int32(40),
			MaxTokens:       proto.Int32(-1),
			Stop:            []string{"\n\n", "User:"},
			Seed:            proto.Int64(-42),
			RepeatPenalty:   proto.Float64(1.1),
			PresencePenalty: proto.Float64(-0.5),
			NumCtx:          proto.Int32(8192),
		},
		Format:    &tokenwirev1.Format{Kind: &tokenwirev1.Format_JsonSchema{JsonSchema: schema}},
		KeepAlive: durationpb.New(90*time.Second + 500*time.Millisecond),
		Images:    [][]byte{{0x89, 'P', 'N', 'G', 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0xff}},
		Think:     tokenwirev1.Think_THINK_LOW,
		Suffix:    "",
		Raw:       false,
	}
}

// codeName is the canonical status name (codes.Code.String() is CamelCase).
func codeName(c codes.Code) string {
	names := [...]string{"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
		"NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
		"FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
		"UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}
	if int(c) < len(names) {
		return names[c]
	}
	return c.String()
}
