// Command loadgen is the compiled reader of the tokenwire benchmark: it opens
// streams against the Go upstream directly (ndjson), through the FastAPI peer
// (sse) or through tokenwire (grpc), and prints one JSON object of figures.
// Being compiled, it can read far more tokens per second than any of the
// servers can send, so what it measures is the server, not itself.
//
// Tokens are counted by text: every upstream token is 17 characters (a space
// and 16 hex digits holding its emission time in Unix ns), so a message
// carrying n tokens has 17·n characters whatever the framing or coalescing.
//
// The gRPC side needs no generated code: requests and responses are encoded
// with protowire against the field numbers of protos/tokenwire/v1 (request:
// model=1, prompt=2; Token: text=1, done=2), so the reader does only what the
// measurement needs.
//
// Modes (-mode):
//
//	throughput  -streams workers each run streams back to back; tokens that
//	            arrive inside the window count. With -interval-us > 0 it also
//	            records per-token latency (arrival − emission) in the window.
//	ttft        -requests sequential streams; time from call to first text.
//	cancel      -requests sequential streams; cancel after -cancel-after
//	            tokens and ask the upstream's /stats when it saw the close.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/tokenwire/tokenwire/bench/rawcodec"
)

const tokenWidth = 17

var errStopped = errors.New("stopped by the reader")

// onText is called with the text of each message as it arrives; returning
// false asks the stream to stop (the caller then cancels it).
type onText func(text []byte, arrival int64) bool

// opener runs one stream to its end and reports whether it ended cleanly
// (a final done message).
type opener interface {
	run(ctx context.Context, prompt string, fn onText) (done bool, err error)
}

// -- gRPC ----------------------------------------------------------------------

type grpcOpener struct {
	conns []*grpc.ClientConn
	next  atomic.Uint64
	model string
}

var generateDesc = &grpc.StreamDesc{StreamName: "Generate", ServerStreams: true}

func (g *grpcOpener) run(ctx context.Context, prompt string, fn onText) (bool, error) {
	conn := g.conns[g.next.Add(1)%uint64(len(g.conns))]
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := conn.NewStream(ctx, generateDesc, "/tokenwire.v1.GenerationService/Generate",
		grpc.ForceCodec(rawcodec.Codec{}))
	if err != nil {
		return false, err
	}
	req := protowire.AppendTag(nil, 1, protowire.BytesType)
	req = protowire.AppendString(req, g.model)
	req = protowire.AppendTag(req, 2, protowire.BytesType)
	req = protowire.AppendString(req, prompt)
	if err := st.SendMsg(&req); err != nil {
		return false, err
	}
	if err := st.CloseSend(); err != nil {
		return false, err
	}
	var msg []byte
	done := false
	for {
		if err := st.RecvMsg(&msg); err != nil {
			if err == io.EOF {
				return done, nil
			}
			return done, err
		}
		arrival := time.Now().UnixNano()
		text, isDone, err := decodeToken(msg)
		if err != nil {
			return done, err
		}
		if !fn(text, arrival) {
			cancel()
			return done, errStopped
		}
		done = done || isDone
	}
}

// decodeToken pulls text (1) and done (2) out of a tokenwire.v1.Token.
func decodeToken(b []byte) (text []byte, done bool, err error) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, false, protowire.ParseError(n)
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return nil, false, protowire.ParseError(m)
			}
			text, b = v, b[m:]
		case num == 2 && typ == protowire.VarintType:
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return nil, false, protowire.ParseError(m)
			}
			done, b = v != 0, b[m:]
		default:
			m := protowire.ConsumeFieldValue(num, typ, b)
			if m < 0 {
				return nil, false, protowire.ParseError(m)
			}
			b = b[m:]
		}
	}
	return text, done, nil
}

// -- HTTP (NDJSON direct, SSE through the peer) -------------------------------------

type httpOpener struct {
	client *http.Client
	url    string
	sse    bool
	model  string
}

var (
	ndjsonText = []byte(`"response":"`)
	sseText    = []byte(`"text":"`)
	doneTrue   = []byte(`"done":true`)
)

func (h *httpOpener) run(ctx context.Context, prompt string, fn onText) (bool, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	body, _ := json.Marshal(map[string]any{"model": h.model, "prompt": prompt, "stream": true})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.url, bytes.NewReader(body))
	if err != nil {
		return false, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := h.client.Do(req)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return false, fmt.Errorf("HTTP %d: %s", resp.StatusCode, bytes.TrimSpace(b))
	}
	key := ndjsonText
	if h.sse {
		key = sseText
	}
	br := bufio.NewReaderSize(resp.Body, 64<<10)
	done := false
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			if err == io.EOF {
				return done, nil
			}
			return done, err
		}
		if h.sse {
			if !bytes.HasPrefix(line, []byte("data: ")) {
				continue
			}
		} else if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		arrival := time.Now().UnixNano()
		if bytes.Contains(line, []byte(`"error"`)) {
			return done, fmt.Errorf("error in stream: %s", bytes.TrimSpace(line))
		}
		var text []byte
		if i := bytes.Index(line, key); i >= 0 {
			rest := line[i+len(key):]
			if j := bytes.IndexByte(rest, '"'); j >= 0 {
				text = rest[:j]
			}
		}
		if !fn(text, arrival) {
			cancel()
			return done, errStopped
		}
		done = done || bytes.Contains(line, doneTrue)
	}
}

// -- figures -------------------------------------------------------------------------

func quantiles(xs []int64) map[string]float64 {
	out := map[string]float64{"n": float64(len(xs))}
	if len(xs) == 0 {
		return out
	}
	slices.Sort(xs)
	at := func(q float64) float64 {
		i := int(math.Ceil(q*float64(len(xs)))) - 1
		return float64(xs[max(i, 0)])
	}
	out["p50"], out["p90"], out["p99"], out["p999"] = at(0.5), at(0.9), at(0.99), at(0.999)
	out["min"], out["max"] = float64(xs[0]), float64(xs[len(xs)-1])
	var sum float64
	for _, x := range xs {
		sum += float64(x)
	}
	out["mean"] = sum / float64(len(xs))
	return out
}

// cpuTicks returns utime+stime (all threads, clock ticks) of a process and of its
// descendants (the workers of a --workers supervisor).
func cpuTicks(pid int) int64 {
	if pid <= 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return -1
	}
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.ParseInt(fields[11], 10, 64)
	st, _ := strconv.ParseInt(fields[12], 10, 64)
	total := ut + st
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, t := range tasks {
		kids, _ := os.ReadFile(t)
		for _, k := range strings.Fields(string(kids)) {
			if child, err := strconv.Atoi(k); err == nil {
				if c := cpuTicks(child); c > 0 {
					total += c
				}
			}
		}
	}
	return total
}

type config struct {
	mode, proto, target, model, statsURL, idPrefix                string
	streams, tokens, requests, cancelAfter, warmupRequests, conns int
	intervalUS, warmup, window, ramp                              float64
	serverPID                                                     int
}

func prompt(tokens int, intervalUS float64, id string) string {
	p := fmt.Sprintf("bench tokens=%d interval_us=%g", tokens, intervalUS)
	if id != "" {
		p += " id=" + id
	}
	return p
}

func countTokens(text []byte, ntext *int64) int64 {
	*ntext += int64(len(text))
	return int64(len(text) / tokenWidth)
}

// throughput: workers run streams back to back; count what arrives in the window.
func throughput(cfg config, op opener) map[string]any {
	const (
		warming = iota
		measuring
		over
	)
	var phase atomic.Int32
	var inWindow, msgsInWindow, errorsN, streamsDone, streamsBad atomic.Int64
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	paced := cfg.intervalUS > 0
	lat := make([][]int64, cfg.streams)
	errSamples := make([]string, 0)
	var errMu sync.Mutex
	start := time.Now()
	for w := 0; w < cfg.streams; w++ {
		go func(w int) {
			if cfg.ramp > 0 {
				delay := time.Duration(float64(w) / float64(cfg.streams) * cfg.ramp * float64(time.Second))
				select {
				case <-time.After(delay):
				case <-ctx.Done():
					return
				}
			}
			for phase.Load() != over {
				got, ntext := int64(0), int64(0)
				done, err := op.run(ctx, prompt(cfg.tokens, cfg.intervalUS, ""),
					func(text []byte, arrival int64) bool {
						n := countTokens(text, &ntext)
						got += n
						if phase.Load() == measuring {
							inWindow.Add(n)
							msgsInWindow.Add(1)
							if paced {
								for i := 0; i+tokenWidth <= len(text); i += tokenWidth {
									ts, perr := strconv.ParseUint(string(text[i+1:i+tokenWidth]), 16, 64)
									if perr == nil {
										lat[w] = append(lat[w], arrival-int64(ts))
									}
								}
							}
						}
						return true
					})
				if phase.Load() == over {
					return
				}
				if err != nil || !done || got != int64(cfg.tokens) || ntext != got*tokenWidth {
					errorsN.Add(1)
					streamsBad.Add(1)
					errMu.Lock()
					if len(errSamples) < 5 {
						errSamples = append(errSamples, fmt.Sprintf("err=%v done=%v tokens=%d/%d", err, done, got, cfg.tokens))
					}
					errMu.Unlock()
					if err != nil {
						time.Sleep(10 * time.Millisecond)
					}
				} else {
					streamsDone.Add(1)
				}
			}
		}(w)
	}
	time.Sleep(time.Duration((cfg.warmup + cfg.ramp) * float64(time.Second)))
	cpu0 := cpuTicks(cfg.serverPID)
	t0 := time.Now()
	errors0 := errorsN.Load()
	phase.Store(measuring)
	time.Sleep(time.Duration(cfg.window * float64(time.Second)))
	phase.Store(over)
	t1 := time.Now()
	cpu1 := cpuTicks(cfg.serverPID)
	tokens := inWindow.Load()
	msgs := msgsInWindow.Load()
	errorsInRun := errorsN.Load()
	// Streams still open are not waited for: main exits right after printing and
	// the kernel closing the sockets is the cancel every server sees.
	stop()
	elapsed := t1.Sub(t0).Seconds()
	out := map[string]any{
		"mode": "throughput", "proto": cfg.proto, "streams": cfg.streams,
		"tokens_per_stream": cfg.tokens, "interval_us": cfg.intervalUS,
		"window_s": elapsed, "tokens": tokens, "tokens_per_s": float64(tokens) / elapsed,
		"messages":         msgs,
		"server_cpu_ticks": cpu1 - cpu0, "streams_completed": streamsDone.Load(),
		"errors": errorsInRun, "errors_in_window": errorsInRun - errors0,
		"error_samples": errSamples, "started_unix": start.Unix(),
	}
	if paced {
		var all []int64
		for _, l := range lat {
			all = append(all, l...)
		}
		out["latency_ns"] = quantiles(all)
	}
	return out
}

// ttft: sequential streams; time from the call to the first text.
func ttft(cfg config, op opener) map[string]any {
	var samples []int64
	errs := 0
	for i := 0; i < cfg.warmupRequests+cfg.requests; i++ {
		var first int64
		t0 := time.Now().UnixNano()
		done, err := op.run(context.Background(), prompt(cfg.tokens, cfg.intervalUS, ""),
			func(text []byte, arrival int64) bool {
				if first == 0 && len(text) > 0 {
					first = arrival
				}
				return true
			})
		if err != nil || !done || first == 0 {
			errs++
			continue
		}
		if i >= cfg.warmupRequests {
			samples = append(samples, first-t0)
		}
	}
	return map[string]any{"mode": "ttft", "proto": cfg.proto, "errors": errs,
		"ttft_ns": quantiles(samples)}
}

// cancel: sequential streams cancelled after k tokens; the upstream says when
// it saw the connection close.
func cancelRun(cfg config, op opener) map[string]any {
	cancelAt := map[string]int64{}
	errs := 0
	for i := 0; i < cfg.warmupRequests+cfg.requests; i++ {
		id := fmt.Sprintf("%s-%d", cfg.idPrefix, i)
		seen := 0
		var tc int64
		_, err := op.run(context.Background(), prompt(cfg.tokens, cfg.intervalUS, id),
			func(text []byte, arrival int64) bool {
				seen += len(text) / tokenWidth
				if seen >= cfg.cancelAfter {
					tc = time.Now().UnixNano()
					return false
				}
				return true
			})
		if !errors.Is(err, errStopped) {
			errs++
			continue
		}
		if i >= cfg.warmupRequests {
			cancelAt[id] = tc
		}
	}
	// Ask until every cancelled stream's close reached the upstream (a late
	// close is a sample too, however late), for at most 10 s.
	var stats struct {
		Records map[string]struct {
			DisconnectNS int64 `json:"disconnect_ns"`
			Completed    bool  `json:"completed"`
		} `json:"records"`
	}
	for deadline := time.Now().Add(10 * time.Second); ; {
		resp, err := http.Get(cfg.statsURL + "?prefix=" + cfg.idPrefix + "-")
		if err != nil {
			fail(err)
		}
		err = json.NewDecoder(resp.Body).Decode(&stats)
		resp.Body.Close()
		if err != nil {
			fail(err)
		}
		closed := 0
		for id := range cancelAt {
			if stats.Records[id].DisconnectNS != 0 {
				closed++
			}
		}
		if closed == len(cancelAt) || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	var samples []int64
	missing := 0
	for id, tc := range cancelAt {
		rec, ok := stats.Records[id]
		if !ok || rec.DisconnectNS == 0 {
			missing++
			continue
		}
		samples = append(samples, rec.DisconnectNS-tc)
	}
	return map[string]any{"mode": "cancel", "proto": cfg.proto, "errors": errs,
		"never_closed": missing, "cancel_to_close_ns": quantiles(samples)}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "loadgen:", err)
	os.Exit(1)
}

func main() {
	var cfg config
	flag.StringVar(&cfg.mode, "mode", "throughput", "throughput, ttft or cancel")
	flag.StringVar(&cfg.proto, "proto", "grpc", "grpc (tokenwire), ndjson (upstream direct) or sse (FastAPI peer)")
	flag.StringVar(&cfg.target, "target", "", "host:port of the server to read from (loopback)")
	flag.StringVar(&cfg.model, "model", "bench", "model name sent")
	flag.StringVar(&cfg.statsURL, "stats-url", "", "upstream /stats URL (cancel mode)")
	flag.StringVar(&cfg.idPrefix, "id-prefix", "cancel", "request id prefix (cancel mode)")
	flag.IntVar(&cfg.streams, "streams", 1, "concurrent streams (throughput)")
	flag.IntVar(&cfg.tokens, "tokens", 256, "tokens per stream")
	flag.Float64Var(&cfg.intervalUS, "interval-us", 0, "upstream pace, µs per token (0: no delay)")
	flag.Float64Var(&cfg.warmup, "warmup", 2, "seconds before the window opens")
	flag.Float64Var(&cfg.window, "window", 5, "seconds of measurement")
	flag.Float64Var(&cfg.ramp, "ramp", 0, "seconds over which streams are opened")
	flag.IntVar(&cfg.requests, "requests", 200, "sequential requests (ttft, cancel)")
	flag.IntVar(&cfg.warmupRequests, "warmup-requests", 20, "uncounted requests first (ttft, cancel)")
	flag.IntVar(&cfg.cancelAfter, "cancel-after", 5, "tokens read before cancelling")
	flag.IntVar(&cfg.conns, "conns", 1, "gRPC connections (streams are spread over them)")
	flag.IntVar(&cfg.serverPID, "server-pid", 0, "pid whose CPU time is sampled at the window edges")
	flag.Parse()

	// A comma-separated list of targets (gRPC only): connection i goes to target i mod n,
	// as a round-robin channel keeps one connection per backend.
	targets := strings.Split(cfg.target, ",")
	for _, target := range targets {
		host, _, err := net.SplitHostPort(target)
		if err != nil {
			fail(err)
		}
		if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
			fail(fmt.Errorf("refusing target %s: the benchmark is loopback-only", target))
		}
	}
	if len(targets) > 1 && cfg.proto != "grpc" {
		fail(fmt.Errorf("a list of targets is for -proto=grpc only"))
	}
	var op opener
	switch cfg.proto {
	case "grpc":
		g := &grpcOpener{model: cfg.model}
		for i := 0; i < cfg.conns; i++ {
			conn, err := grpc.NewClient(targets[i%len(targets)],
				grpc.WithTransportCredentials(insecure.NewCredentials()),
				grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(32<<20)))
			if err != nil {
				fail(err)
			}
			defer conn.Close()
			g.conns = append(g.conns, conn)
		}
		op = g
	case "ndjson", "sse":
		path := "/api/generate"
		if cfg.proto == "sse" {
			path = "/v1/generate"
		}
		op = &httpOpener{
			client: &http.Client{Transport: &http.Transport{
				MaxIdleConns: 4096, MaxIdleConnsPerHost: 4096, DisableCompression: true,
				Proxy: nil, ForceAttemptHTTP2: false,
			}},
			url: "http://" + cfg.target + path, sse: cfg.proto == "sse", model: cfg.model,
		}
	default:
		fail(fmt.Errorf("unknown -proto %q", cfg.proto))
	}
	var out map[string]any
	switch cfg.mode {
	case "throughput":
		out = throughput(cfg, op)
	case "ttft":
		out = ttft(cfg, op)
	case "cancel":
		out = cancelRun(cfg, op)
	default:
		fail(fmt.Errorf("unknown -mode %q", cfg.mode))
	}
	out["reader"] = "go"
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(out); err != nil {
		fail(err)
	}
}
