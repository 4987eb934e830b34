// Command wrr measures how grpc-go spreads tokenwire Generate calls over several
// replicas under one load balancing policy: round_robin, or weighted_round_robin
// (gRFC A58), which weighs each replica by the ORCA load report tokenwire puts in
// every model call's trailers (endpoint-load-metrics-bin).
//
//	wrr [-policy weighted_round_robin] [-workers 8] [-warmup 3s] [-measure 6s] host:port...
//
// Workers call Generate back to back (a closed loop); calls started during the
// warm-up (the policy's blackout period) are not counted. One JSON line on stdout:
// calls per replica, errors, latency, throughput, and each replica's last report
// with the weight the policy derives from it.
//
// What grpc-go needs for weighted_round_robin with per-call reports: the blank
// import below (it registers the policy, and imports google.golang.org/grpc/orca,
// whose init installs the parser that turns the trailer into balancer.DoneInfo's
// ServerLoad) and the policy in the service config. No interceptor, no ORCA
// service on the server: enableOobLoadReport stays false, its default.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"sync"
	"time"

	v3orcapb "github.com/cncf/xds/go/xds/data/orca/v3"
	"google.golang.org/grpc"
	_ "google.golang.org/grpc/balancer/weightedroundrobin"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	tokenwirev1 "github.com/tokenwire/tokenwire/gen/go/tokenwire/v1"
)

const trailerKey = "endpoint-load-metrics-bin"

// serviceConfig is the whole service config of a policy. The weighted one shortens
// the blackout (10 s by default: a replica's weight is used only after it has
// reported that long) and recomputes weights every 100 ms (the floor; 1 s by
// default) so that a short measurement sees it at work.
func serviceConfig(policy string) (string, error) {
	switch policy {
	case "round_robin":
		return `{"loadBalancingConfig": [{"round_robin": {}}]}`, nil
	case "weighted_round_robin":
		return `{"loadBalancingConfig": [{"weighted_round_robin": {
			"blackoutPeriod": "1s", "weightUpdatePeriod": "0.1s",
			"weightExpirationPeriod": "60s"}}]}`, nil
	}
	return "", fmt.Errorf("unknown policy %q", policy)
}

type replicaReport struct {
	ApplicationUtilization float64 `json:"application_utilization"`
	RPSFractional          float64 `json:"rps_fractional"`
	EPS                    float64 `json:"eps"`
	CPUUtilization         float64 `json:"cpu_utilization"`
	InFlightStreams        float64 `json:"in_flight_streams"`
	TokensPerSecond        float64 `json:"tokens_per_second"`
	// What weighted_round_robin computes from it (errorUtilizationPenalty 1).
	Weight float64 `json:"weight"`
}

type tally struct {
	mu        sync.Mutex
	calls     map[string]int
	codes     map[string]int
	latencies []float64 // ms, counted calls only
	reports   map[string]replicaReport
	withLoad  int // counted calls whose trailers held a report
	badReport int
}

func (t *tally) record(counted bool, addr string, err error, ms float64, md metadata.MD) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var report *replicaReport
	if values := md.Get(trailerKey); len(values) == 1 {
		load := &v3orcapb.OrcaLoadReport{}
		if proto.Unmarshal([]byte(values[0]), load) != nil {
			t.badReport++
		} else {
			r := replicaReport{
				ApplicationUtilization: load.GetApplicationUtilization(),
				RPSFractional:          load.GetRpsFractional(),
				EPS:                    load.GetEps(),
				CPUUtilization:         load.GetCpuUtilization(),
				InFlightStreams:        load.GetNamedMetrics()["in_flight_streams"],
				TokensPerSecond:        load.GetNamedMetrics()["tokens_per_second"],
			}
			if r.ApplicationUtilization > 0 && r.RPSFractional > 0 {
				r.Weight = r.RPSFractional / (r.ApplicationUtilization + r.EPS/r.RPSFractional)
			}
			report = &r
		}
	}
	if report != nil && addr != "" {
		t.reports[addr] = *report
	}
	if !counted {
		return
	}
	t.codes[status.Code(err).String()]++
	if err != nil {
		return
	}
	t.calls[addr]++
	t.latencies = append(t.latencies, ms)
	if report != nil {
		t.withLoad++
	}
}

func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[int(p*float64(len(sorted)-1)+0.5)]
}

func main() {
	policy := flag.String("policy", "weighted_round_robin", "round_robin or weighted_round_robin")
	workers := flag.Int("workers", 8, "calls in flight at once (each worker calls back to back)")
	warmup := flag.Duration("warmup", 3*time.Second, "calls started this soon are not counted")
	measure := flag.Duration("measure", 6*time.Second, "then calls are counted for this long")
	flag.Parse()
	targets := flag.Args()
	if len(targets) == 0 {
		fmt.Fprintln(os.Stderr, "usage: wrr [flags] host:port...")
		os.Exit(2)
	}
	config, err := serviceConfig(*policy)
	if err != nil {
		fail(err)
	}
	// A fixed list of replicas, as a DNS name with several addresses would give.
	builder := manual.NewBuilderWithScheme("replicas")
	var state resolver.State
	for _, target := range targets {
		state.Endpoints = append(state.Endpoints,
			resolver.Endpoint{Addresses: []resolver.Address{{Addr: target}}})
	}
	builder.InitialState(state)
	conn, err := grpc.NewClient(builder.Scheme()+":///tokenwire",
		grpc.WithResolvers(builder),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(config))
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	client := tokenwirev1.NewGenerationServiceClient(conn)
	request := &tokenwirev1.GenerateRequest{Model: "tiny", Prompt: "Why is the sky blue?"}

	t := &tally{calls: map[string]int{}, codes: map[string]int{},
		reports: map[string]replicaReport{}}
	begin := time.Now()
	countFrom, stopAt := begin.Add(*warmup), begin.Add(*warmup+*measure)
	var wg sync.WaitGroup
	for w := 0; w < *workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				started := time.Now()
				if !started.Before(stopAt) {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				var p peer.Peer
				var trailer metadata.MD
				stream, err := client.Generate(ctx, request, grpc.Peer(&p), grpc.Trailer(&trailer))
				if err == nil {
					for err == nil {
						_, err = stream.Recv()
					}
					if errors.Is(err, io.EOF) {
						err = nil
					}
				}
				cancel()
				addr := ""
				if p.Addr != nil {
					addr = p.Addr.String()
				}
				t.record(!started.Before(countFrom), addr, err,
					float64(time.Since(started).Microseconds())/1000, trailer)
			}
		}()
	}
	wg.Wait()
	counted := time.Since(countFrom).Seconds()

	sort.Float64s(t.latencies)
	mean := 0.0
	for _, ms := range t.latencies {
		mean += ms / float64(len(t.latencies))
	}
	out := map[string]any{
		"policy":           *policy,
		"workers":          *workers,
		"measure_s":        measure.Seconds(),
		"calls":            t.calls,
		"codes":            t.codes,
		"ok":               len(t.latencies),
		"calls_per_second": float64(len(t.latencies)) / counted,
		"mean_ms":          mean,
		"p50_ms":           percentile(t.latencies, 0.5),
		"p99_ms":           percentile(t.latencies, 0.99),
		"with_report":      t.withLoad,
		"bad_reports":      t.badReport,
		"reports":          t.reports,
	}
	line, err := json.Marshal(out)
	if err != nil {
		fail(err)
	}
	fmt.Println(string(line))
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "wrr:", err)
	os.Exit(1)
}
