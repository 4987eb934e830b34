// Command upstream is an Ollama-compatible /api/generate that streams
// synthetic tokens as fast as the machine allows or at a fixed pace, for the
// tokenwire benchmark (bench/README.md). Written in Go so that the upstream is
// never what the benchmark measures.
//
// Wire format as Ollama's (shared/OLLAMA.md §1, §3): HTTP/1.1, chunked,
// Content-Type application/x-ndjson, one JSON object per line, a flush after
// every line, a final line with done:true and the engine metrics.
//
// Every token's text is a space and 16 lower-case hex digits: the wall-clock
// time (Unix ns, CLOCK_REALTIME) at which the line was handed to the socket.
// Readers count tokens as len(text)/17 and compute per-token latency as
// arrival − emission on the same host clock.
//
// A stream is configured by key=value words in the prompt (so that the same
// request works direct, through the FastAPI peer and through tokenwire) or by
// the same keys in the query string; flags give the defaults:
//
//	tokens=N       tokens in the stream
//	interval_us=U  pace: token i is due at start + i·U µs (0: no delay)
//	id=S           name under which the request is recorded in /stats
//
// GET /stats returns what happened to requests that carried an id: when the
// handler started, how many tokens it wrote, and when the upstream learned that
// the client went away before the end (Unix ns: its request context ended, or a
// write failed, whichever came first), plus pacing lag counters. DELETE /stats
// clears it.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const hexDigits = "0123456789abcdef"

type record struct {
	StartNS      int64 `json:"start_ns"`
	DisconnectNS int64 `json:"disconnect_ns,omitempty"`
	Tokens       int   `json:"tokens"`
	Completed    bool  `json:"completed"`
}

type server struct {
	defTokens   int
	defInterval time.Duration

	mu      sync.Mutex
	records map[string]*record

	active   atomic.Int64
	requests atomic.Int64
	lagged   atomic.Int64 // paced tokens written more than 5 ms after they were due
	maxLagUS atomic.Int64
}

type params struct {
	tokens   int
	interval time.Duration
	id       string
	model    string
}

func (s *server) parse(r *http.Request) (params, error) {
	p := params{tokens: s.defTokens, interval: s.defInterval, model: "bench"}
	var body struct {
		Model    string `json:"model"`
		Prompt   string `json:"prompt"`
		Messages []struct {
			Content string `json:"content"`
		} `json:"messages"`
	}
	data, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		return p, err
	}
	if len(data) > 0 {
		if err := json.Unmarshal(data, &body); err != nil {
			return p, err
		}
	}
	if body.Model != "" {
		p.model = body.Model
	}
	set := func(k, v string) error {
		switch k {
		case "tokens":
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return fmt.Errorf("bad tokens=%q", v)
			}
			p.tokens = n
		case "interval_us":
			n, err := strconv.ParseFloat(v, 64)
			if err != nil || n < 0 {
				return fmt.Errorf("bad interval_us=%q", v)
			}
			p.interval = time.Duration(n * float64(time.Microsecond))
		case "id":
			p.id = v
		}
		return nil
	}
	prompt := body.Prompt
	for _, m := range body.Messages { // an OpenAI-style chat: the words are in the messages
		prompt += " " + m.Content
	}
	for _, word := range strings.Fields(prompt) {
		if k, v, ok := strings.Cut(word, "="); ok {
			if err := set(k, v); err != nil {
				return p, err
			}
		}
	}
	q, _ := url.ParseQuery(r.URL.RawQuery)
	for k, vs := range q {
		if err := set(k, vs[0]); err != nil {
			return p, err
		}
	}
	return p, nil
}

func (s *server) generate(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "405 method not allowed", http.StatusMethodNotAllowed)
		return
	}
	p, err := s.parse(r)
	if err != nil {
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(http.StatusBadRequest)
		fmt.Fprintf(w, `{"error":%q}`, err.Error())
		return
	}
	s.requests.Add(1)
	s.active.Add(1)
	defer s.active.Add(-1)
	start := time.Now()

	var rec *record
	var finished atomic.Bool
	if p.id != "" {
		rec = &record{StartNS: start.UnixNano()}
		s.mu.Lock()
		s.records[p.id] = rec
		s.mu.Unlock()
		// Runs when net/http cancels the request context: the client closed
		// the connection (its background read saw EOF), or the handler returned.
		stop := context.AfterFunc(r.Context(), func() {
			now := time.Now().UnixNano()
			if !finished.Load() {
				s.mu.Lock()
				if rec.DisconnectNS == 0 {
					rec.DisconnectNS = now
				}
				s.mu.Unlock()
			}
		})
		defer stop()
	}

	ctl := http.NewResponseController(w)
	// /v1/chat/completions answers as an OpenAI-compatible server does (Server-Sent Events,
	// as Ollama's /v1 frames them); /api/generate as Ollama's NDJSON.
	sse := r.URL.Path == "/v1/chat/completions"
	if sse {
		w.Header().Set("Content-Type", "text/event-stream")
	} else {
		w.Header().Set("Content-Type", "application/x-ndjson")
	}
	w.WriteHeader(http.StatusOK)

	prefix := `{"model":` + strconv.Quote(p.model) + `,"created_at":"`
	ssePrefix := `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":` +
		strconv.FormatInt(start.Unix(), 10) + `,"model":` + strconv.Quote(p.model) +
		`,"choices":[{"index":0,"delta":{"role":"assistant","content":" `
	buf := make([]byte, 0, 256)
	var timer *time.Timer
	written := 0
	ctx := r.Context()
	for i := 0; i < p.tokens; i++ {
		if p.interval > 0 && i > 0 {
			due := start.Add(time.Duration(i) * p.interval)
			if d := time.Until(due); d > 0 {
				if timer == nil {
					timer = time.NewTimer(d)
				} else {
					timer.Reset(d)
				}
				select {
				case <-ctx.Done():
					s.finish(rec, written, false)
					return
				case <-timer.C:
				}
			}
			if lag := time.Since(due); lag > 5*time.Millisecond {
				s.lagged.Add(1)
				us := lag.Microseconds()
				for {
					old := s.maxLagUS.Load()
					if us <= old || s.maxLagUS.CompareAndSwap(old, us) {
						break
					}
				}
			}
		} else if ctx.Err() != nil {
			s.finish(rec, written, false)
			return
		}
		now := time.Now()
		if sse {
			buf = append(buf[:0], ssePrefix...)
		} else {
			buf = append(buf[:0], prefix...)
			buf = now.UTC().AppendFormat(buf, time.RFC3339Nano)
			buf = append(buf, `","response":" `...)
		}
		ns := uint64(now.UnixNano())
		for shift := 60; shift >= 0; shift -= 4 {
			buf = append(buf, hexDigits[(ns>>uint(shift))&0xf])
		}
		if sse {
			buf = append(buf, `"},"finish_reason":null}]}`+"\n\n"...)
		} else {
			buf = append(buf, `","done":false}`+"\n"...)
		}
		if _, err := w.Write(buf); err != nil {
			s.finish(rec, written, false)
			return
		}
		if err := ctl.Flush(); err != nil {
			s.finish(rec, written, false)
			return
		}
		written++
	}
	if timer != nil {
		timer.Stop()
	}
	total := time.Since(start)
	if sse {
		finished.Store(true)
		tail := `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":0,"model":` +
			strconv.Quote(p.model) + `,"choices":[{"index":0,"delta":{"role":"assistant",` +
			`"content":""},"finish_reason":"stop"}]}` + "\n\n" +
			`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":0,"model":` +
			strconv.Quote(p.model) + `,"choices":[],"usage":{"prompt_tokens":4,` +
			`"completion_tokens":` + strconv.Itoa(p.tokens) + `,"total_tokens":` +
			strconv.Itoa(p.tokens+4) + `}}` + "\n\ndata: [DONE]\n\n"
		_, _ = io.WriteString(w, tail)
		_ = ctl.Flush()
		s.finish(rec, written, true)
		return
	}
	final := map[string]any{
		"model":                p.model,
		"created_at":           time.Now().UTC().Format(time.RFC3339Nano),
		"response":             "",
		"done":                 true,
		"done_reason":          "stop",
		"context":              []int{1, 2, 3},
		"total_duration":       total.Nanoseconds(),
		"load_duration":        1000,
		"prompt_eval_count":    4,
		"prompt_eval_duration": 1000,
		"eval_count":           p.tokens,
		"eval_duration":        max(total.Nanoseconds(), 1),
	}
	line, _ := json.Marshal(final)
	finished.Store(true)
	_, _ = w.Write(append(line, '\n'))
	_ = ctl.Flush()
	s.finish(rec, written, true)
}

// finish records the end of a stream. One that ended early ended because the
// client went away: if the context callback has not recorded when (a failed
// write can notice a reset connection first), now is when the upstream knew.
func (s *server) finish(rec *record, written int, completed bool) {
	if rec == nil {
		return
	}
	now := time.Now().UnixNano()
	s.mu.Lock()
	rec.Tokens = written
	rec.Completed = completed
	if !completed && rec.DisconnectNS == 0 {
		rec.DisconnectNS = now
	}
	s.mu.Unlock()
}

func (s *server) stats(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodDelete {
		s.mu.Lock()
		s.records = map[string]*record{}
		s.mu.Unlock()
		s.lagged.Store(0)
		s.maxLagUS.Store(0)
		w.WriteHeader(http.StatusNoContent)
		return
	}
	prefix := r.URL.Query().Get("prefix")
	s.mu.Lock()
	out := make(map[string]record)
	for id, rec := range s.records {
		if strings.HasPrefix(id, prefix) {
			out[id] = *rec
		}
	}
	s.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"active":        s.active.Load(),
		"requests":      s.requests.Load(),
		"lagged_tokens": s.lagged.Load(),
		"max_lag_us":    s.maxLagUS.Load(),
		"records":       out,
	})
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (loopback only)")
	tokens := flag.Int("tokens", 256, "default tokens per stream")
	intervalUS := flag.Float64("interval-us", 0, "default pace in µs per token (0: no delay)")
	portFile := flag.String("port-file", "", "write the bound port here once listening")
	flag.Parse()

	host, _, err := net.SplitHostPort(*listen)
	if err != nil {
		log.Fatal(err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		log.Fatalf("refusing to listen on %s: the benchmark upstream is loopback-only", *listen)
	}
	s := &server{
		defTokens:   *tokens,
		defInterval: time.Duration(*intervalUS * float64(time.Microsecond)),
		records:     map[string]*record{},
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/api/generate", s.generate)
	mux.HandleFunc("/v1/chat/completions", s.generate)
	mux.HandleFunc("/v1/models", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"object":"list","data":[{"id":"bench","object":"model"}]}`)
	})
	mux.HandleFunc("/stats", s.stats)
	mux.HandleFunc("/api/version", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		_, _ = io.WriteString(w, `{"version":"0.0.0-bench"}`)
	})
	mux.HandleFunc("/api/tags", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		_, _ = io.WriteString(w, `{"models":[]}`)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		_, _ = io.WriteString(w, "Ollama is running")
	})
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	if *portFile != "" {
		if err := os.WriteFile(*portFile, []byte(strconv.Itoa(port)+"\n"), 0o644); err != nil {
			log.Fatal(err)
		}
	}
	log.Printf("bench upstream listening on %s", ln.Addr())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	log.Fatal(srv.Serve(ln))
}
