// kata-faultproxy: a TLS reverse proxy between a client under test and the test bed's
// kube-apiserver that injects the faults real API servers have, at configurable rates:
// throttling (429 with Retry-After), server errors (500/503), connection resets before the
// request is forwarded, responses lost after the request took effect (the request reaches the
// API server, the client sees a reset), slow responses, and watch streams cut mid-way.
//
// It serves with the API server's own certificate (same CA, so a kubeconfig only changes the
// port) and forwards the client's Authorization header, so RBAC and the audit log still see the
// client's identity. Counters of what it injected are kept in -stats-file (JSON).
//
// Standard library only: the test bed builds it offline with `go build`.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

type rates struct {
	throttle, serverError, reset, lostResponse, slow, cutWatch float64
}

type proxy struct {
	upstream   *httputil.ReverseProxy
	rates      rates
	slow       time.Duration
	onlyMethod string
	onlyPath   string
	retryAfter int
	statsFile  string

	mu    sync.Mutex
	rnd   *rand.Rand
	stats map[string]int
}

func (p *proxy) roll() float64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.rnd.Float64()
}

func (p *proxy) count(kind string, r *http.Request) {
	p.mu.Lock()
	p.stats[kind]++
	snapshot, _ := json.Marshal(p.stats)
	p.mu.Unlock()
	if kind != "requests" {
		log.Printf("inject %s: %s %s", kind, r.Method, r.URL.RequestURI())
	}
	if p.statsFile == "" {
		return
	}
	tmp := p.statsFile + ".tmp"
	if err := os.WriteFile(tmp, snapshot, 0o644); err == nil {
		_ = os.Rename(tmp, p.statsFile)
	}
}

func isWatch(r *http.Request) bool {
	w := r.URL.Query().Get("watch")
	return w == "true" || w == "1"
}

func writeStatus(w http.ResponseWriter, code int, reason, message string, retryAfter int) {
	body := map[string]any{
		"kind": "Status", "apiVersion": "v1", "metadata": map[string]any{},
		"status": "Failure", "message": message, "reason": reason, "code": code,
	}
	if retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(retryAfter))
		body["details"] = map[string]any{"retryAfterSeconds": retryAfter}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(body)
}

// resetConnection closes the client's TCP connection with an RST (SO_LINGER 0).
func resetConnection(w http.ResponseWriter) {
	hj, ok := w.(http.Hijacker)
	if !ok {
		panic(http.ErrAbortHandler)
	}
	conn, _, err := hj.Hijack()
	if err != nil {
		panic(http.ErrAbortHandler)
	}
	raw := conn
	if t, ok := conn.(*tls.Conn); ok {
		raw = t.NetConn()
	}
	if tcp, ok := raw.(*net.TCPConn); ok {
		_ = tcp.SetLinger(0)
	}
	_ = conn.Close()
}

// discard is a ResponseWriter that drops the upstream response (for lost responses).
type discard struct{ h http.Header }

func (d *discard) Header() http.Header         { return d.h }
func (d *discard) Write(b []byte) (int, error) { return len(b), nil }
func (d *discard) WriteHeader(int)             {}

// cutAfter wraps a streaming response and aborts it once the deadline passes.
type cutAfter struct {
	http.ResponseWriter
	deadline time.Time
}

func (c *cutAfter) Write(b []byte) (int, error) {
	if time.Now().After(c.deadline) {
		panic(http.ErrAbortHandler)
	}
	return c.ResponseWriter.Write(b)
}

func (c *cutAfter) Flush() {
	if f, ok := c.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (p *proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.count("requests", r)
	if (p.onlyMethod != "" && r.Method != p.onlyMethod) || (p.onlyPath != "" && !strings.Contains(r.URL.Path, p.onlyPath)) {
		p.upstream.ServeHTTP(w, r)
		return
	}
	x := p.roll()
	rt := p.rates
	switch {
	case x < rt.throttle:
		p.count("throttle-429", r)
		writeStatus(w, http.StatusTooManyRequests, "TooManyRequests", "injected by kata-faultproxy: too many requests", p.retryAfter)
		return
	case x < rt.throttle+rt.serverError:
		code := http.StatusInternalServerError
		if p.roll() < 0.5 {
			code = http.StatusServiceUnavailable
		}
		p.count(fmt.Sprintf("server-error-%d", code), r)
		writeStatus(w, code, "InternalError", "injected by kata-faultproxy: server error", 0)
		return
	case x < rt.throttle+rt.serverError+rt.reset:
		p.count("reset", r)
		resetConnection(w)
		return
	case x < rt.throttle+rt.serverError+rt.reset+rt.lostResponse && !isWatch(r):
		p.count("lost-response", r)
		// Buffer the body so the upstream request is complete, forward it, then drop the answer.
		body, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body))
		p.upstream.ServeHTTP(&discard{h: http.Header{}}, r)
		resetConnection(w)
		return
	case x < rt.throttle+rt.serverError+rt.reset+rt.lostResponse+rt.slow:
		p.count("slow", r)
		time.Sleep(p.slow)
	}
	if isWatch(r) && p.roll() < rt.cutWatch {
		p.count("cut-watch", r)
		cut := time.Duration(500+p.roll()*2500) * time.Millisecond
		p.upstream.ServeHTTP(&cutAfter{ResponseWriter: w, deadline: time.Now().Add(cut)}, r)
		return
	}
	p.upstream.ServeHTTP(w, r)
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	upstreamURL := flag.String("upstream", "", "kube-apiserver URL (https://127.0.0.1:PORT)")
	caFile := flag.String("ca", "", "CA that signed the API server's certificate")
	certFile := flag.String("cert", "", "serving certificate (the API server's)")
	keyFile := flag.String("key", "", "serving key")
	portFile := flag.String("port-file", "", "write the listening port here once ready")
	statsFile := flag.String("stats-file", "", "keep JSON counters of injected faults here")
	seed := flag.Int64("seed", 1, "random seed (a run is reproducible for a given request order)")
	var rt rates
	flag.Float64Var(&rt.throttle, "rate-429", 0, "fraction of requests answered 429 with Retry-After")
	flag.Float64Var(&rt.serverError, "rate-5xx", 0, "fraction answered 500 or 503")
	flag.Float64Var(&rt.reset, "rate-reset", 0, "fraction whose connection is reset before forwarding")
	flag.Float64Var(&rt.lostResponse, "rate-lost", 0, "fraction forwarded, then the connection reset (answer lost)")
	flag.Float64Var(&rt.slow, "rate-slow", 0, "fraction delayed by -slow before forwarding")
	flag.Float64Var(&rt.cutWatch, "rate-cut-watch", 0, "fraction of watch streams cut after 0.5-3 s")
	slow := flag.Duration("slow", 2*time.Second, "delay of a slow response")
	retryAfter := flag.Int("retry-after", 1, "Retry-After seconds of injected 429s")
	onlyMethod := flag.String("only-method", "", "inject faults only into requests of this HTTP method (e.g. PATCH); others pass untouched")
	onlyPath := flag.String("only-path", "", "inject faults only into requests whose path contains this (e.g. /jobs); others pass untouched")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("[faultproxy] ")
	if *upstreamURL == "" || *caFile == "" || *certFile == "" || *keyFile == "" {
		log.Fatal("-upstream, -ca, -cert and -key are required (see -help)")
	}
	target, err := url.Parse(*upstreamURL)
	if err != nil {
		log.Fatalf("bad -upstream %q: %v", *upstreamURL, err)
	}
	caPEM, err := os.ReadFile(*caFile)
	if err != nil {
		log.Fatalf("reading -ca: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		log.Fatalf("-ca %s holds no PEM certificate", *caFile)
	}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.FlushInterval = -1 // stream watches as they come
	rp.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: false, MaxIdleConnsPerHost: 100}
	rp.ErrorLog = log.New(io.Discard, "", 0)
	p := &proxy{upstream: rp, rates: rt, slow: *slow, onlyMethod: *onlyMethod, onlyPath: *onlyPath, retryAfter: *retryAfter, statsFile: *statsFile, rnd: rand.New(rand.NewSource(*seed)), stats: map[string]int{}}

	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatalf("loading -cert/-key: %v", err)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("listen %s: %v", *listen, err)
	}
	// HTTP/1.1 only: a reset needs the raw connection (Hijack), which HTTP/2 does not offer.
	srv := &http.Server{Handler: p, TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){}, ErrorLog: log.New(io.Discard, "", 0)}
	tlsLn := tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}})
	port := ln.Addr().(*net.TCPAddr).Port
	if *portFile != "" {
		tmp := filepath.Join(filepath.Dir(*portFile), "."+filepath.Base(*portFile)+".tmp")
		if err := os.WriteFile(tmp, []byte(strconv.Itoa(port)), 0o644); err != nil {
			log.Fatalf("writing -port-file: %v", err)
		}
		if err := os.Rename(tmp, *portFile); err != nil {
			log.Fatalf("writing -port-file: %v", err)
		}
	}
	log.Printf("listening on 127.0.0.1:%d, forwarding to %s, rates %+v", port, target, rt)
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		_ = srv.Close()
	}()
	if err := srv.Serve(tlsLn); err != nil && err != http.ErrServerClosed {
		log.Fatal(err)
	}
}
